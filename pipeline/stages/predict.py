"""`onnxpipe predict`: classify arrays and images from the command line with a run's selected variant.

Inputs:
  .npy / .npz   model inputs, one sample (e.g. 1x28x28) or a batch (N x 1x28x28); `raw=True` applies the
                run's normalization first (x*scale, then (x-mean)/std), for data as it came from the source.
  PNG / JPEG    (image models, and sequence models read row by row) grayscale images of any size. They are
                turned into what the model was trained on: pixels to [0, 1], light strokes on a dark
                background (the digits and MNIST convention; dark-on-light images are inverted), resized to the
                source's native resolution first (8x8 for digits, whose images were upsampled to 28x28 in
                training), then to the model's input size, then normalized with the run's mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.data import normalize
from ..errors import DataError
from ..runfolder import Run

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
NATIVE_SIZE = {"digits": 8}   # sources whose images were resized for the model: resize real images the same way


@dataclass
class Prediction:
    source: str
    label: int
    probability: float
    top: list[tuple[int, float]]

    def to_json(self) -> dict:
        return {"source": self.source, "class": self.label, "probability": self.probability,
                "top": [{"class": c, "probability": p} for c, p in self.top]}


def _dataset(run: Run) -> dict:
    ds = run.dataset_info
    if not ds:
        raise DataError(f"run {run.root} records no data (imported without --data), so onnxpipe does not know how "
                        "to normalize images or raw arrays; pass arrays that are already model inputs")
    return ds


def model_grid(run: Run) -> tuple[int, int]:
    """(height, width) an image must become: the image size, or (T, F) for a sequence model."""
    ds = _dataset(run)
    shape = ds.get("sample_shape") or []
    if ds.get("family") == "image":
        channels_last = ds.get("layout") == "nhwc"
        if len(shape) != 3 or shape[-1 if channels_last else 0] != 1:
            raise DataError(f"images need a 1-channel image model; this run takes samples shaped {shape}")
        return (shape[0], shape[1]) if channels_last else (shape[1], shape[2])
    if len(shape) != 2:
        raise DataError(f"this run takes samples shaped {shape}; images fit image models or (T, F) sequence models")
    if getattr(run.model_config(), "vocab_size", 0):
        raise DataError("this model reads token ids, not pixels; pass a .npy of int64 token ids")
    return shape[0], shape[1]


def load_image(path: Path, grid: tuple[int, int], *, native: int | None = None, invert: str = "auto") -> np.ndarray:
    """An image file -> float32 (H, W) in [0, 1], light strokes on dark, at the model's grid."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent -> paper white
                img = Image.alpha_composite(canvas, img)
            gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    if invert not in ("auto", "yes", "no"):
        raise DataError(f"invert must be auto, yes or no, got {invert!r}")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if invert == "yes" or (invert == "auto" and float(border.mean()) > 0.5):
        gray = 1.0 - gray
    img = Image.fromarray(gray, mode="F")
    if native and native < min(gray.shape):
        img = img.resize((native, native), Image.Resampling.BOX)  # area average, as a scanner would
    h, w = grid
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)     # pixel-centre bilinear, as training resized
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def _array_from_file(path: Path, input_name: str) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            for candidate in (input_name, "x", "inputs"):
                if candidate in names:
                    return z[candidate]
            if len(names) == 1:
                return z[names[0]]
            raise DataError(f"{path} holds arrays {names}; name the one to classify {input_name!r}, 'x' or 'inputs'")
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path} as {path.suffix}: {e}") from None


def load_inputs(run: Run, path: Path, input_shape: list, input_type: str, *, raw: bool = False,
                invert: str = "auto") -> np.ndarray:
    """A file -> a batch the model takes (N, ...) in the model's dtype, normalized."""
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        ds = _dataset(run)
        x = load_image(path, model_grid(run), native=NATIVE_SIZE.get(ds.get("source", "")), invert=invert)
        x = normalize(x, ds["normalization"], unit=True)
        if ds.get("family") == "image":
            x = x[..., None] if ds.get("layout") == "nhwc" else x[None]   # the channel axis
        return x[None].astype(np.float32)
    if suffix not in (".npy", ".npz"):
        raise DataError(f"{path}: unknown input type {suffix!r}; pass .npy/.npz arrays or .png/.jpg images")
    x = _array_from_file(path, input_name="")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: the array must be numeric, got {x.dtype}")
    per_sample = input_shape[1:]
    if x.ndim == len(per_sample):
        x = x[None]
    if x.ndim != len(input_shape) or any(isinstance(d, int) and d != s for d, s in zip(per_sample, x.shape[1:])):
        want = "x".join(str(d) if isinstance(d, int) else "?" for d in per_sample)
        raise DataError(f"{path}: array of shape {list(x.shape)} does not fit the model, which takes {want} per sample "
                        f"(one sample, or N samples batch-first)")
    if len(x) == 0:
        raise DataError(f"{path}: the array holds no samples")
    if input_type == "tensor(int64)":
        return x.astype(np.int64)
    x = x.astype(np.float32)
    if raw:
        x = normalize(x, _dataset(run)["normalization"])
    if not np.isfinite(x).all():
        raise DataError(f"{path}: the array holds NaN or Inf values")
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_files(run: Run, paths: list[Path], *, variant: str | None = None, device: str = "cpu",
                  raw: bool = False, invert: str = "auto", top: int = 1) -> list[Prediction]:
    from ..core.predictors import load_predictor

    variant = variant or run.selected or "onnx"
    predictor = load_predictor(run, variant, device=device)  # sha256-checked
    inner = getattr(predictor, "inner", None)
    if inner is not None:
        shape, kind = list(inner.get_inputs()[0].shape), inner.get_inputs()[0].type
    else:  # a torch variant: the run's recorded sample shape (sequence length free)
        shape, kind = [None, *_dataset(run)["sample_shape"]], "tensor(float)"
        if _dataset(run).get("family") == "sequence":
            shape[1] = None
    out = []
    for path in paths:
        x = load_inputs(run, path, shape, kind, raw=raw, invert=invert)
        probs = softmax(np.asarray(predictor(x), dtype=np.float64))
        for i, p in enumerate(probs):
            order = np.argsort(-p)[:max(1, top)]
            name = str(path) if len(probs) == 1 else f"{path}[{i}]"
            out.append(Prediction(name, int(order[0]), float(p[order[0]]), [(int(c), float(p[c])) for c in order]))
    return out
