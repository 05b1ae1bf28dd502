"""Data sources, the seeded split, and normalization.

Sources (the `--data` option):
  digits      scikit-learn's bundled handwritten digits (1,797 8x8 images; no download)
  mnist:DIR   the standard MNIST IDX files (gzipped or raw) in DIR: train-* and t10k-*
  npz:FILE    a user's own arrays `x` (N,H,W), (N,1,H,W) or (N,T,F) and `y` (N,) integer labels

Image-family models get (N, 1, S, S) images resized to the model's image size;
sequence-family models read each image as a sequence of rows, (N, T=H, F=W).
Pixels are scaled to [0, 1] and standardized with the training split's mean and std;
the split, the statistics and a fingerprint of the source go into the manifest.
"""
from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Dataset:
    """Arrays ready for the model (float32 inputs, int64 labels) and the record of how they were made."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# --- sources ---------------------------------------------------------------------------------------

def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (http://yann.lecun.com/exdb/mnist/ format), gzipped or raw."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000 then a type byte and a rank byte, e.g. 00000803 for images)"
        )
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says {dims} ({expected} bytes of data) but the file holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, prefix: str, kind: str) -> Path:
    hits = sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and kind in p.name)
    if not hits:
        raise DataError(
            f"no {prefix}*{kind}* file in {folder}; expected the MNIST files "
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or raw)"
        )
    return hits[0]


def _load_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    if not folder.is_dir():
        raise DataError(f"MNIST folder {folder} does not exist")
    parts = {}
    for prefix in ("train", "t10k"):
        x = read_idx(_find_idx(folder, prefix, "images"))
        y = read_idx(_find_idx(folder, prefix, "labels"))
        if x.ndim != 3:
            raise DataError(f"{prefix} images must have rank 3 (N, H, W), got shape {x.shape}")
        if y.ndim != 1:
            raise DataError(f"{prefix} labels must have rank 1 (N,), got shape {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{prefix}: {len(x)} images but {len(y)} labels; the counts must match")
        parts[prefix] = (x, y)
    (xtr, ytr), (xte, yte) = parts["train"], parts["t10k"]
    return xtr, ytr, xte, yte, 255.0


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{path} must hold arrays named 'x' and 'y'; it holds {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from None
    if y.ndim != 1:
        raise DataError(f"{path}: y must have shape (N,), got {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}; the counts must match")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: x must be numeric, got {x.dtype}")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return x, y, scale


def _load_digits() -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target, 16.0


# --- shaping, split, normalization ------------------------------------------------------------------

def normalize(x: np.ndarray, norm: dict, *, unit: bool = False) -> np.ndarray:
    """The one input normalization, used by training data, `onnxpipe predict` and every package:
    (x * scale - mean) / std, with the run's recorded `normalization` {scale, mean, std}.

    `x` is in the source's own units (digits 0..16, uint8 pixels 0..255), or already in [0, 1] with
    `unit=True` (an image file read as grayscale)."""
    x = np.asarray(x, dtype=np.float32)
    if not unit:
        x = x * np.float32(norm["scale"])
    return (x - np.float32(norm["mean"])) / np.float32(norm["std"])


def denormalize(x: np.ndarray, norm: dict) -> np.ndarray:
    """`normalize(..., unit=True)` undone: model inputs back to pixels in [0, 1] (x * std + mean), for showing
    an input as an image (the web package draws its examples this way)."""
    return np.asarray(x, dtype=np.float32) * np.float32(norm["std"]) + np.float32(norm["mean"])


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{where}: labels out of range [{lo}, {hi}]; the model has {num_classes} classes "
            f"(labels must be 0..{num_classes - 1}; use --set num_classes={hi + 1} for more classes)"
        )
    return y.astype(np.int64)


def _check_rank(x: np.ndarray, where: str) -> None:
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[1] == 1)):
        raise DataError(
            f"{where}: x has shape {x.shape}; expected (N, H, W) or (N, 1, H, W) images, or (N, T, F) sequences"
        )


def _shape_for(x: np.ndarray, family: str, image_size: int, where: str) -> np.ndarray:
    """(N,H,W) / (N,1,H,W) / (N,T,F) -> (N,1,S,S) for images or (N,T,F) for sequences."""
    _check_rank(x, where)
    if x.ndim == 4:
        x = x[:, 0]
    x = x.astype(np.float32)
    if family == "sequence":
        return x
    if min(x.shape[1:]) < 4:
        raise DataError(f"{where}: images of {x.shape[1]}x{x.shape[2]} are too small for the CNN")
    if x.shape[1:] == (image_size, image_size):
        return x[:, None]
    import torch
    from torch.nn import functional as F

    t = torch.from_numpy(x)[:, None]
    return F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False).numpy()


def split_minimum(val_fraction: float, test_fraction: float) -> int:
    """Samples of each class that give the smaller of the validation and test splits at least one row."""
    return int(np.ceil(1.5 / min(val_fraction, test_fraction)))


def stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Seeded split of indices into len(fractions)+1 parts (the last takes the rest), per class."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for i, f in enumerate(fractions):
            n = int(round(f * len(idx)))
            parts[i].append(idx[start:start + n])
            start += n
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def load_dataset(
    source: str = "digits",
    family: str = "image",
    *,
    image_size: int = 28,
    num_classes: int = 10,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
    layout: str = "nchw",
) -> Dataset:
    """Load `source`, shape it for `family`, split it (seeded, stratified) and normalize it.

    `layout="nhwc"` gives images as (N, S, S, 1), for models from channels-last frameworks (Keras, TF)."""
    if family not in ("image", "sequence"):
        raise DataError(f"unknown model family {family!r}")
    if layout not in ("nchw", "nhwc") or (layout == "nhwc" and family != "image"):
        raise DataError(f"layout must be nchw or nhwc (images only), got {layout!r} for {family} data")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0,1) and sum < 1")
    kind, _, arg = source.partition(":")
    if kind == "digits" and not arg:
        x, y, scale = _load_digits()
        x_test = y_test = None
    elif kind == "mnist" and arg:
        x, y, x_test, y_test, scale = _load_mnist(Path(arg).expanduser())
    elif kind == "npz" and arg:
        x, y, scale = _load_npz(Path(arg).expanduser())
        x_test = y_test = None
    else:
        raise DataError(f"unknown data source {source!r}; use digits, mnist:DIR or npz:FILE")

    fingerprint = _fingerprint(x, y) if x_test is None else _fingerprint(x, y, x_test, y_test)
    _check_rank(x, source)
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise DataError(f"{source}: x holds NaN or infinite values; clean the data first")
    if len(y) == 0:
        raise DataError(f"{source} holds no samples; a run needs labelled samples for its train, validation and "
                        "test splits")
    y = _check_labels(y, num_classes, source)
    if x_test is None:
        train_idx, val_idx, test_idx = stratified_split(y, (1 - val_fraction - test_fraction, val_fraction), seed)
        x_test, y_test = x[test_idx], y[test_idx]
        x_tr, y_tr, x_va, y_va = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    else:
        y_test = _check_labels(y_test, num_classes, source + " (t10k)")
        train_idx, val_idx = stratified_split(y, (1 - val_fraction,), seed)
        x_tr, y_tr, x_va, y_va = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{source}: train images are {x.shape[1:]} but test images are {x_test.shape[1:]}")
    if limit:  # a seeded subset, for quick tests and smoke runs
        rng = np.random.default_rng(seed)
        def sub(a, b, n):
            keep = np.sort(rng.permutation(len(a))[:n])
            return a[keep], b[keep]
        x_tr, y_tr = sub(x_tr, y_tr, limit)
        x_va, y_va = sub(x_va, y_va, max(limit // 4, 1))
        x_test, y_test = sub(x_test, y_test, max(limit // 4, 1))

    # Every stage needs train (calibration, training) and test rows (budgets); validation is training's own
    # need (early stopping), checked there, so a small data set can still be imported and judged.
    empty = [name for name, part in (("train", y_tr), ("test", y_test)) if len(part) == 0]
    if empty:
        per_class = split_minimum(val_fraction, test_fraction)
        raise DataError(f"{source}: the seeded split of {len(y)} samples (train {len(y_tr)}, "
                        f"validation {len(y_va)}, test {len(y_test)}) leaves the {' and '.join(empty)} split empty; "
                        f"give at least {per_class} samples of each class (the split is stratified: "
                        f"{val_fraction:.0%} of each class to validation, {test_fraction:.0%} to test)")
    shaped = [_shape_for(a, family, image_size, source) for a in (x_tr, x_va, x_test)]
    unit = shaped[0] * np.float32(1.0 / scale)
    norm = {"scale": 1.0 / scale, "mean": float(unit.mean()), "std": float(unit.std()) or 1.0}
    x_tr, x_va, x_test = (normalize(a, norm) for a in shaped)
    if layout == "nhwc":
        x_tr, x_va, x_test = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x_tr, x_va, x_test))
    info = {
        "source": source,
        "family": family,
        "fingerprint": fingerprint,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "limit": limit,
        "image_size": image_size if family == "image" else None,
        "num_classes": num_classes,
        "split": {"train": len(y_tr), "val": len(y_va), "test": len(y_test),
                  "train_sha": _fingerprint(train_idx), "val_sha": _fingerprint(val_idx)},
        "normalization": norm,
        "sample_shape": list(x_tr.shape[1:]),
        "layout": layout,
    }
    return Dataset(x_tr.astype(np.float32), y_tr, x_va.astype(np.float32), y_va,
                   x_test.astype(np.float32), y_test, info)


def reload_dataset(info: dict) -> Dataset:
    """Load the same data a run was made with; an error if the source changed since."""
    if not info:
        raise DataError("this run has no data: it was imported without --data; import it again with "
                        "--data digits, mnist:DIR or npz:FILE")
    ds = load_dataset(
        info["source"], info["family"], image_size=info.get("image_size") or 28,
        num_classes=info["num_classes"], seed=info["seed"], val_fraction=info["val_fraction"],
        test_fraction=info["test_fraction"], limit=info.get("limit"), layout=info.get("layout", "nchw"),
    )
    if ds.info["fingerprint"] != info["fingerprint"]:
        raise DataError(
            f"the data at {info['source']} changed since this run was made "
            f"(fingerprint {ds.info['fingerprint']} != recorded {info['fingerprint']}); retrain or point --data at the original"
        )
    return ds
