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

from ..core.data import NP_DTYPES, Rows, normalize
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


def _primary(specs):
    return next((s for s in specs if s.role in ("data", "tokens")), specs[0])


def _model_grid(spec) -> tuple[int, int]:
    """(height, width) an image file must become: the image input's size, or (T, F) for a sequence input."""
    if spec.kind == "image":
        h, w, _ = spec.image_hwc()
        return h, w
    if spec.kind == "sequence":
        return spec.shape[0], spec.shape[1]
    if spec.role == "tokens":
        raise DataError("this model reads token ids, not pixels; pass a .npy of integer token ids or an .npz with "
                        "one array per input")
    raise DataError(f"input {spec.name!r} takes samples shaped {list(spec.shape)}; images fit image models or "
                    "(T, F) sequence models")


def model_grid(run: Run, variant: str | None = None) -> tuple[int, int]:
    """(height, width) an image must become for the run's (first) input: what the web package's page draws
    into. The page draws gray images, so an image input must have one channel."""
    spec = _primary(run.spec_of(variant).input_specs(run.model_config_of(variant)))
    if spec.kind == "image" and spec.image_hwc()[2] != 1:
        raise DataError(f"images need a 1-channel image model; this run's input {spec.name!r} takes {list(spec.shape)}")
    return _model_grid(spec)


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


def _arrays_from_file(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """{input name: array} from a .npy (the first input) or an .npz (arrays named like the inputs; a single
    array, 'x' or 'inputs' is the first input)."""
    try:
        if path.suffix == ".npy":
            return {names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
            named = {n: z[n] for n in names if n in files}
            if not named:
                first = next((c for c in ("x", "inputs") if c in files), files[0] if len(files) == 1 else None)
                if first is None:
                    raise DataError(f"{path} holds arrays {files}; name them like the model's inputs "
                                    f"({', '.join(names)}), or 'x' for the first")
                named = {names[0]: z[first]}
            return named
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path} as {path.suffix}: {e}") from None


def _fit(path: Path, spec, x: np.ndarray) -> np.ndarray:
    """One sample or a batch of `spec`'s per-sample shape (dynamic axes free) -> a batch."""
    per_sample = list(spec.shape)
    if x.ndim == len(per_sample):
        x = x[None]
    fixed = [a for a in range(len(per_sample)) if a + 1 not in spec.dynamic]
    if x.ndim != len(per_sample) + 1 or any(x.shape[1 + a] != per_sample[a] for a in fixed):
        want = "x".join("?" if a + 1 in spec.dynamic else str(d) for a, d in enumerate(per_sample))
        raise DataError(f"{path}: array {spec.name!r} of shape {list(x.shape)} does not fit the model, which takes "
                        f"{want} per sample (one sample, or N samples batch-first)")
    if len(x) == 0:
        raise DataError(f"{path}: the array holds no samples")
    return x


def load_inputs(run: Run, path: Path, specs, *, raw: bool = False, invert: str = "auto") -> Rows:
    """A file -> a batch of every model input (Rows), in the model's dtypes, normalized."""
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    primary = _primary(specs)
    norms = {r["name"]: r.get("normalization") for r in (run.dataset_info or {}).get("inputs", [])}
    if suffix in IMAGE_SUFFIXES:
        ds = _dataset(run)
        x = load_image(path, _model_grid(primary), native=NATIVE_SIZE.get(ds.get("source", "")), invert=invert)
        x = normalize(x, norms.get(primary.name) or ds["normalization"], unit=True)
        if primary.kind == "image":   # gray, repeated to the model's channels as training did for gray sources
            _, _, c = primary.image_hwc()
            x = np.repeat(x[..., None], c, -1) if primary.layout == "nhwc" else np.repeat(x[None], c, 0)
        given = {primary.name: x[None].astype(np.float32)}
    elif suffix in (".npy", ".npz"):
        given = _arrays_from_file(path, [s.name for s in specs])
        for name, x in given.items():
            spec = next(s for s in specs if s.name == name)
            if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
                raise DataError(f"{path}: array {name!r} must be numeric, got {x.dtype}")
            x = _fit(path, spec, x)
            if spec.is_float:
                x = x.astype(np.float32)
                if raw and spec.role == "data":
                    x = normalize(x, norms.get(name) or _dataset(run)["normalization"])
                if not np.isfinite(x).all():
                    raise DataError(f"{path}: array {name!r} holds NaN or Inf values")
            given[name] = x.astype(NP_DTYPES[spec.dtype])
    else:
        raise DataError(f"{path}: unknown input type {suffix!r}; pass .npy/.npz arrays or .png/.jpg images")
    n = len(given[primary.name]) if primary.name in given else len(next(iter(given.values())))
    out = {}
    for spec in specs:   # inputs the file does not give: a mask of full-length rows, zeros for constants
        if spec.name in given:
            out[spec.name] = given[spec.name]
        elif spec.role == "mask" and primary.name in given:
            out[spec.name] = np.ones(given[primary.name].shape[:2], NP_DTYPES[spec.dtype])
        elif spec.role == "constant" and primary.name in given:
            out[spec.name] = np.zeros((n, *given[primary.name].shape[1:2]), NP_DTYPES[spec.dtype])
        else:
            raise DataError(f"{path} gives no array for input {spec.name!r}; pass an .npz with one array per input "
                            f"({', '.join(s.name for s in specs)})")
    return Rows(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_files(run: Run, paths: list[Path], *, variant: str | None = None, device: str = "cpu",
                  raw: bool = False, invert: str = "auto", top: int = 1) -> list[Prediction]:
    from ..core.predictors import load_predictor

    variant = variant or run.selected or "onnx"
    predictor = load_predictor(run, variant, device=device)  # sha256-checked
    specs = run.spec_of(variant).input_specs(run.model_config_of(variant))
    out = []
    for path in paths:
        x = load_inputs(run, path, specs, raw=raw, invert=invert)
        probs = softmax(np.asarray(predictor(*x.arrays), dtype=np.float64))
        for i, p in enumerate(probs):
            order = np.argsort(-p)[:max(1, top)]
            name = str(path) if len(probs) == 1 else f"{path}[{i}]"
            out.append(Prediction(name, int(order[0]), float(p[order[0]]), [(int(c), float(p[c])) for c in order]))
    return out
