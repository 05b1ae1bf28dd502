"""Data sources, the seeded split, and the one normalization (layer 2).

Sources (the `--data` option):
  digits      scikit-learn's bundled handwritten digits (1,797 8x8 images, values 0..16; no download)
  mnist:DIR   the standard MNIST IDX files (gzipped or raw) in DIR: train-* and t10k-*
  npz:FILE    a user's own arrays: `x` (the model's first input) or one array per input name
              (e.g. input_ids, attention_mask), and `y` (N,) integer labels

What a model gets is shaped by its inputs (ModelSpec.input_specs, pipeline/../models/registry.py):

  image (C,H,W) / (H,W,C) floats   images resized bilinearly to (H, W); a gray source repeated to C channels
                                   (so 3-channel vision models run on digits); npz images may be (N,H,W),
                                   (N,C,H,W) or (N,H,W,C) and are arranged to the model's layout
  sequence (T,F) floats            each image read as T = H rows of F = W features
  tokens (T,) integers             each image as the sequence of its pixel intensities (digits: 64 tokens,
                                   vocabulary 17); with a mask input, a seeded quarter of the rows is
                                   shortened and padded with 0 so the mask is exercised
  mask (T,)                        True / 1 where a token is real, consistent with the tokens' lengths
  constant                         zeros (e.g. token_type_ids)

Float inputs are scaled to [0, 1] (uint8 by 1/255, digits by 1/16) and standardized with the training
split's mean and std (`normalize`, the one rule also used by `onnxpipe predict`); the split, the
statistics, the inputs and a fingerprint of the source go into the manifest, and later stages reload
exactly that data.

Options that shape the data (each recorded and replayed by `reload_dataset`):
  classes     keep only these source labels, relabelled 0..k-1 in the order given (digits 0-4, then 5-9)
  per_class   at most N labelled rows of each class in the training and validation splits (a few-shot
              data set; the test split stays whole: it is the measurement)
  normalization  use these statistics ({input name: {scale, mean, std}}) instead of the training split's
              (a transferred model keeps the normalization its backbone was trained with)"""
from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
PAD_TOKEN = 0
SHORTENED = 0.25          # the share of token rows shortened and padded when the model reads a mask


class Rows:
    """Model inputs for N samples: named arrays with a common first axis, in the model's input order.

    `rows[i]`, `rows[a:b]` and `rows[index_array]` select samples (of every input); `rows.arrays` is the
    tuple to call a predictor with (`fn(*rows.arrays)`)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        if not arrays:
            raise ValueError("Rows needs at least one input")
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise DataError(f"the inputs hold different numbers of samples: "
                            f"{ {k: len(v) for k, v in arrays.items()} }; every array needs one row per sample")
        self._arrays = dict(arrays)

    def __len__(self) -> int:
        return len(next(iter(self._arrays.values())))

    def __getitem__(self, idx) -> "Rows":
        if isinstance(idx, (int, np.integer)):
            idx = slice(int(idx), int(idx) + 1)
        return Rows({k: v[idx] for k, v in self._arrays.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    @property
    def names(self) -> list[str]:
        return list(self._arrays)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(self._arrays.values())

    def items(self):
        return self._arrays.items()

    def get(self, name: str) -> np.ndarray:
        return self._arrays[name]

    @property
    def first(self) -> np.ndarray:
        return next(iter(self._arrays.values()))

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape[1:]) for k, v in self._arrays.items()}

    def to_npz(self) -> dict[str, np.ndarray]:
        """For an .npz file: the first input as `inputs` (what a single-input model's reference.npz always
        held), every other as `input:<name>`."""
        items = list(self._arrays.items())
        return {"inputs": items[0][1], **{f"input:{k}": v for k, v in items[1:]}}

    @classmethod
    def from_npz(cls, z, names: list[str] | None = None) -> "Rows":
        """Inputs as stored by `to_npz`; `names` (the recorded input names) names the first one."""
        first = (names or ["inputs"])[0]
        rest = {k.removeprefix("input:"): z[k] for k in z.files if k.startswith("input:")}
        return cls({first: z["inputs"], **rest})

    def __repr__(self) -> str:
        return f"Rows({len(self)} x {self.sample_shapes()})"


@dataclass
class Dataset:
    """Inputs ready for the model (Rows), int64 labels, and the record of how they were made."""

    x_train: Rows
    y_train: np.ndarray
    x_val: Rows
    y_val: np.ndarray
    x_test: Rows
    y_test: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The first input's per-sample shape."""
        return tuple(self.x_train.first.shape[1:])

    @property
    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.x_train.sample_shapes()


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


def _load_npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "y" not in z:
                raise DataError(f"{path} must hold arrays named 'x' and 'y' (the inputs, and the labels; a model with "
                                f"several inputs: one array per input name instead of 'x'); it holds {sorted(z.files)}")
            arrays = {k: z[k] for k in z.files if k != "y"}
            y = z["y"]
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from None
    if not arrays:
        raise DataError(f"{path} holds labels 'y' but no input array ('x', or one per input name)")
    if y.ndim != 1:
        raise DataError(f"{path}: y must have shape (N,), got {y.shape}")
    for k, a in arrays.items():
        if len(a) != len(y):
            raise DataError(f"{path}: {k} has {len(a)} samples but y has {len(y)}; the counts must match")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise DataError(f"{path}: {k} must be numeric, got {a.dtype}")
    return arrays, y


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target


# --- the one normalization ------------------------------------------------------------------------

def normalize(x: np.ndarray, norm: dict, *, unit: bool = False) -> np.ndarray:
    """The one input normalization, used by training data, `onnxpipe predict` and every package:
    (x * scale - mean) / std, with the run's recorded `normalization` {scale, mean, std}.

    `x` is in the source's own units (digits 0..16, uint8 pixels 0..255), or already in [0, 1] with
    `unit=True` (an image file read as grayscale)."""
    x = np.asarray(x, dtype=np.float32)
    if not unit:
        x = x * np.float32(norm["scale"])
    return (x - np.float32(norm["mean"])) / np.float32(norm["std"])


def source_scale(x: np.ndarray, source: str) -> float:
    """The factor that brings a source's values into [0, 1]: 1/16 for digits, 1/255 for uint8, else 1."""
    if source.split(":", 1)[0] == "digits":
        return 1.0 / 16.0
    if source.split(":", 1)[0] == "mnist" or x.dtype == np.uint8:
        return 1.0 / 255.0
    return 1.0


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


# --- shaping the source for the model's inputs ---------------------------------------------------------

def to_image(x: np.ndarray, want, where: str) -> np.ndarray:
    """(N,H,W), (N,C,H,W) or (N,H,W,C) -> the input's (N,C,H,W) or (N,H,W,C), resized to its (H, W); a gray
    source is repeated to the input's channel count."""
    h, w, c = want.image_hwc()
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]                                        # gray (N, 1, H, W)
    elif x.ndim == 4:
        if x.shape[1] in (1, c) and not (x.shape[3] == c and x.shape[1] != c):
            pass                                              # channels first
        elif x.shape[3] in (1, c):
            x = x.transpose(0, 3, 1, 2)                       # channels last -> first
        else:
            raise DataError(f"{where}: images shaped {tuple(x.shape[1:])} have neither 1 nor {c} channels first or "
                            f"last; input {want.name!r} takes {c}-channel images")
    else:
        raise DataError(f"{where}: x has shape {tuple(x.shape)}; input {want.name!r} takes images: (N, H, W), "
                        f"(N, C, H, W) or (N, H, W, C)")
    x = x.astype(np.float32)
    if min(x.shape[2:]) < 4:
        raise DataError(f"{where}: images of {x.shape[2]}x{x.shape[3]} are too small for input {want.name!r}")
    if x.shape[2:] != (h, w):
        import torch
        from torch.nn import functional as F

        x = F.interpolate(torch.from_numpy(x), size=(h, w), mode="bilinear", align_corners=False).numpy()
    if x.shape[1] == 1 and c != 1:
        x = np.repeat(x, c, axis=1)                           # digits and MNIST are gray: repeat for RGB models
    elif x.shape[1] != c:
        raise DataError(f"{where}: the images have {x.shape[1]} channels; input {want.name!r} takes {c}")
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if want.layout == "nhwc" else x


def _as_images_hw(x: np.ndarray, where: str) -> np.ndarray:
    """A gray image source as (N, H, W): sequences read its rows, tokens its pixels."""
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 4 and x.shape[3] == 1:
        return x[..., 0]
    if x.ndim == 3:
        return x
    raise DataError(f"{where}: x has shape {tuple(x.shape)}; expected (N, H, W) or (N, 1, H, W) images, or "
                    "(N, T, F) sequences")


def _lengths(n: int, t: int, seed: int) -> np.ndarray:
    """Seeded token-row lengths: a quarter of the rows shortened to between T/2 and T-1, the rest full."""
    rng = np.random.default_rng(seed + 7)
    out = np.full(n, t, np.int64)
    if t > 1:
        short = rng.random(n) < SHORTENED
        out[short] = rng.integers(max(1, t // 2), t, short.sum())
    return out


def shape_for_model(source: str, raw: dict[str, np.ndarray], inputs: Sequence, seed: int) -> dict[str, np.ndarray]:
    """The source's arrays (raw units) arranged for each model input, by name."""
    named = {k: v for k, v in raw.items() if k != "x"}
    primary = next((s for s in inputs if s.role in ("data", "tokens")), inputs[0])
    out: dict[str, np.ndarray] = {}
    lengths = None
    for spec in inputs:
        given = named.get(spec.name)
        if given is None and spec is primary and "x" in raw:
            given = raw["x"]
        kind = spec.kind
        where = f"{source} (input {spec.name!r})"
        if kind == "image":
            if given is None:
                raise _missing(source, spec, inputs)
            out[spec.name] = to_image(given, spec, where)
        elif kind == "sequence":
            if given is None:
                raise _missing(source, spec, inputs)
            out[spec.name] = (_as_images_hw(given, where) if given.ndim != 3 else given).astype(np.float32)
        elif kind == "tokens":
            if given is None:
                raise _missing(source, spec, inputs)
            # An (N, T) integer array is token ids as given; an image source is read as its pixel intensities.
            ids = given if given.ndim == 2 else _as_images_hw(given, where).reshape(len(given), -1)
            if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)) or ids.min() < 0:
                raise DataError(f"{where}: token ids must be non-negative integers")
            ids = ids.astype(NP_DTYPES[spec.dtype])
            if spec.high is not None and ids.max() >= spec.high:
                raise DataError(f"{where}: token ids go up to {int(ids.max())} but the model's vocabulary has "
                                f"{spec.high} tokens; use a vocabulary of at least {int(ids.max()) + 1} "
                                f"(for the built-in transformer: --set vocab_size={int(ids.max()) + 1})")
            derived_mask = any(s.role == "mask" and s.name not in named for s in inputs)
            if derived_mask and spec.name not in named:   # image-made tokens: shorten a few rows, pad with 0
                lengths = _lengths(len(ids), ids.shape[1], seed)
                ids = np.where(np.arange(ids.shape[1])[None, :] < lengths[:, None], ids, PAD_TOKEN).astype(ids.dtype)
            out[spec.name] = ids
        elif kind == "mask":
            if given is not None:
                out[spec.name] = given.astype(NP_DTYPES[spec.dtype])
                continue
            tokens = next((out[s.name] for s in inputs if s.role == "tokens" and s.name in out), None)
            if tokens is None:
                raise DataError(f"{source}: input {spec.name!r} is a mask but the model has no token input before "
                                f"it to take its lengths from; give it in an npz as an array named {spec.name!r}")
            lens = lengths if lengths is not None else np.full(len(tokens), tokens.shape[1])
            out[spec.name] = (np.arange(tokens.shape[1])[None, :] < lens[:, None]).astype(NP_DTYPES[spec.dtype])
        else:  # constant, or another input the source does not give: zeros unless the npz names it
            if given is not None:
                out[spec.name] = given.astype(NP_DTYPES[spec.dtype])
            elif spec.role == "constant" or not spec.is_float:
                n = len(next(iter(out.values()))) if out else len(next(iter(raw.values())))
                out[spec.name] = np.zeros((n, *spec.shape), NP_DTYPES[spec.dtype])
            else:
                raise _missing(source, spec, inputs)
    extra = sorted(set(named) - {s.name for s in inputs})
    if extra:
        raise DataError(f"{source} holds array(s) {', '.join(extra)} that are not inputs of the model "
                        f"({', '.join(s.name for s in inputs)}); name them like the inputs, or 'x' for the first")
    return out


def _missing(source: str, spec, inputs) -> DataError:
    names = ", ".join(s.name for s in inputs)
    return DataError(f"{source} gives no data for input {spec.name!r} ({spec.dtype} {list(spec.shape)}); the model "
                     f"takes {names}: use --data npz:FILE with one array per input name ({names}) and 'y'")


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


def parse_classes(text: str | None) -> tuple[int, ...] | None:
    """'0-4' -> (0, 1, 2, 3, 4); '5,7,9' -> (5, 7, 9); None -> None."""
    if text is None or isinstance(text, (tuple, list)):
        return tuple(int(c) for c in text) if text is not None else None
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise DataError(f"bad --classes {text!r}: expected labels such as 0-4 or 5,7,9") from None
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise DataError(f"bad --classes {text!r}: expected distinct labels >= 0, such as 0-4 or 5,7,9")
    return tuple(out)


def _select_classes(arrays: dict[str, np.ndarray], y: np.ndarray, classes: tuple[int, ...], where: str):
    """Rows (of every array) whose label is in `classes`, relabelled to its position there."""
    y = np.asarray(y)
    present = set(np.unique(y).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise DataError(f"{where}: --classes names label(s) {missing} that the data does not have "
                        f"(it has {sorted(present)})")
    keep = np.isin(y, classes)
    lookup = {c: i for i, c in enumerate(classes)}
    return {k: v[keep] for k, v in arrays.items()}, np.array([lookup[int(v)] for v in y[keep]], dtype=np.int64)


def _per_class(arrays: dict[str, np.ndarray], y: np.ndarray, n: int, rng) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """At most n rows of each class (seeded), in their original order."""
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]))
    return {k: v[keep] for k, v in arrays.items()}, y[keep]


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def recorded_inputs(info: dict) -> tuple:
    """The model inputs (InputSpecs) a run's data record was shaped for."""
    if info.get("inputs"):
        from ..models import InputSpec

        return tuple(InputSpec.from_json(r) for r in info["inputs"])
    # a run folder written before the inputs were recorded
    return family_inputs(info["family"], info.get("image_size") or 28, info.get("layout", "nchw"))


def recorded_normalizations(info: dict) -> dict[str, dict]:
    """{input name: {scale, mean, std}} of a run's data record (a record from before the inputs were recorded:
    its one normalization, for its one input)."""
    norms = {r["name"]: r["normalization"] for r in info.get("inputs") or [] if r.get("normalization")}
    if not norms and info.get("normalization"):
        norms = {recorded_inputs(info)[0].name: info["normalization"]}
    return norms


def family_inputs(family: str, image_size: int = 28, layout: str = "nchw") -> tuple:
    """The one default input of a model family ('image': 1 x S x S; 'sequence': rows of the source)."""
    from ..models import InputSpec

    if family == "image":
        shape = (image_size, image_size, 1) if layout == "nhwc" else (1, image_size, image_size)
        return (InputSpec("image", shape, {0: "batch"}, layout=layout),)
    if family == "sequence":
        return (InputSpec("sequence", (8, 8), {0: "batch", 1: "seq_len"}),)
    raise DataError(f"unknown model family {family!r}")


def load_dataset(
    source: str = "digits",
    inputs: str | Sequence = "image",
    *,
    image_size: int = 28,
    num_classes: int | None = 10,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
    layout: str = "nchw",
    classes: tuple[int, ...] | None = None,
    per_class: int | None = None,
    normalization: dict[str, dict] | None = None,
) -> Dataset:
    """Load `source`, shape it for the model's `inputs` (InputSpecs, or a family name for its default input),
    split it (seeded, stratified) and normalize it.

    `num_classes=None`: as many as the labels say (the largest label + 1). `classes`, `per_class` and
    `normalization`: see the module docstring."""
    if isinstance(inputs, str):
        if layout not in ("nchw", "nhwc") or (layout == "nhwc" and inputs != "image"):
            raise DataError(f"layout must be nchw or nhwc (images only), got {layout!r} for {inputs} data")
        inputs = family_inputs(inputs, image_size, layout)
    inputs = tuple(inputs)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0,1) and sum < 1")
    kind, _, arg = source.partition(":")
    test_raw = y_test = None
    if kind == "digits" and not arg:
        x, y = _load_digits()
        raw = {"x": x}
    elif kind == "mnist" and arg:
        x, y, x_test, y_test, _ = _load_mnist(Path(arg).expanduser())
        raw, test_raw = {"x": x}, {"x": x_test}
    elif kind == "npz" and arg:
        raw, y = _load_npz(Path(arg).expanduser())
    else:
        raise DataError(f"unknown data source {source!r}; use digits, mnist:DIR or npz:FILE")

    parts = [raw[k] for k in sorted(raw)]
    fingerprint = _fingerprint(*parts, y) if test_raw is None else _fingerprint(*parts, y, test_raw["x"], y_test)
    for k, a in raw.items():
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise DataError(f"{source}: {k} holds NaN or infinite values; clean the data first")
    if classes:
        classes = tuple(int(c) for c in classes)
        raw, y = _select_classes(raw, y, classes, source)
        if test_raw is not None:
            test_raw, y_test = _select_classes(test_raw, y_test, classes, source + " (t10k)")
    if per_class is not None and per_class < 1:
        raise DataError(f"--per-class must be >= 1, got {per_class}")
    if len(y) == 0:
        raise DataError(f"{source} holds no samples; a run needs labelled samples for its train, validation and "
                        "test splits")
    if num_classes is None:
        num_classes = int(np.max(y)) + 1 if np.issubdtype(np.asarray(y).dtype, np.number) else 0
    y = _check_labels(y, num_classes, source)
    shaped = shape_for_model(source, raw, inputs, seed)
    if test_raw is None:
        train_idx, val_idx, test_idx = stratified_split(y, (1 - val_fraction - test_fraction, val_fraction), seed)
        test_shaped, y_te = {k: v[test_idx] for k, v in shaped.items()}, y[test_idx]
    else:
        y_te = _check_labels(y_test, num_classes, source + " (t10k)")
        if test_raw["x"].shape[1:] != raw["x"].shape[1:]:
            raise DataError(f"{source}: train images are {raw['x'].shape[1:]} but test images are {test_raw['x'].shape[1:]}")
        train_idx, val_idx = stratified_split(y, (1 - val_fraction,), seed)
        test_shaped = shape_for_model(source, test_raw, inputs, seed + 1)
    tr = {k: v[train_idx] for k, v in shaped.items()}
    va = {k: v[val_idx] for k, v in shaped.items()}
    y_tr, y_va = y[train_idx], y[val_idx]
    te = test_shaped
    if limit:  # a seeded subset, for quick tests and smoke runs
        rng = np.random.default_rng(seed)

        def sub(arrays, labels, n):
            keep = np.sort(rng.permutation(len(labels))[:n])
            return {k: v[keep] for k, v in arrays.items()}, labels[keep]
        tr, y_tr = sub(tr, y_tr, limit)
        va, y_va = sub(va, y_va, max(limit // 4, 1))
        te, y_te = sub(te, y_te, max(limit // 4, 1))
    if per_class:  # the labelled rows there are; the test split stays whole
        rng = np.random.default_rng(seed + 1)
        tr, y_tr = _per_class(tr, y_tr, per_class, rng)
        va, y_va = _per_class(va, y_va, per_class, rng)

    # Every stage needs train (calibration, training) and test rows (budgets); validation is training's own
    # need (early stopping), checked there, so a small data set can still be imported and judged.
    empty = [name for name, part in (("train", y_tr), ("test", y_te)) if len(part) == 0]
    if empty:
        per_class = split_minimum(val_fraction, test_fraction)
        raise DataError(f"{source}: the seeded split of {len(y)} samples (train {len(y_tr)}, "
                        f"validation {len(y_va)}, test {len(y_te)}) leaves the {' and '.join(empty)} split empty; "
                        f"give at least {per_class} samples of each class (the split is stratified: "
                        f"{val_fraction:.0%} of each class to validation, {test_fraction:.0%} to test)")

    records, norm_first = [], None
    for spec in inputs:
        rec = spec.to_json()
        if spec.is_float and spec.role == "data":
            scale = source_scale(raw.get(spec.name, raw.get("x", tr[spec.name])), source)
            unit = tr[spec.name] * np.float32(scale)
            norm = {"scale": scale, "mean": float(unit.mean()), "std": float(unit.std()) or 1.0}
            if normalization is not None:
                given = normalization.get(spec.name)
                if given is None:
                    raise DataError(f"{source}: no normalization was given for input {spec.name!r} (given: "
                                    f"{', '.join(normalization) or 'none'}); the inputs must match the source run's")
                if abs(float(given["scale"]) - scale) > 1e-12 * max(1.0, abs(scale)):
                    raise DataError(f"{source}: its pixel scale {scale:g} differs from the normalization given "
                                    f"(scale {given['scale']}); the two data sets must share units")
                norm = {k: float(given[k]) for k in ("scale", "mean", "std")}
            for split in (tr, va, te):
                split[spec.name] = normalize(split[spec.name], norm).astype(NP_DTYPES[spec.dtype])
            rec["normalization"] = norm
            norm_first = norm_first or norm
        rec["sample_shape"] = list(tr[spec.name].shape[1:])
        records.append(rec)
    first = inputs[0]
    info = {
        "source": source,
        "family": "image" if first.kind == "image" else "sequence",
        "fingerprint": fingerprint,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "limit": limit,
        "image_size": first.image_hwc()[0] if first.kind == "image" else None,
        "num_classes": num_classes,
        "split": {"train": len(y_tr), "val": len(y_va), "test": len(y_te),
                  "train_sha": _fingerprint(train_idx), "val_sha": _fingerprint(val_idx)},
        "normalization": norm_first,
        "sample_shape": list(tr[first.name].shape[1:]),
        "layout": first.layout or "nchw",
        "inputs": records,
    }
    if classes:
        info["classes"] = list(classes)
    if per_class:
        info["per_class"] = per_class
    if normalization is not None:
        info["normalization_given"] = True
    return Dataset(Rows(tr), y_tr, Rows(va), y_va, Rows(te), y_te, info)


def reload_dataset(info: dict) -> Dataset:
    """Load the same data a run was made with; an error if the source changed since."""
    if not info:
        raise DataError("this run has no data: it was imported without --data; import it again with "
                        "--data digits, mnist:DIR or npz:FILE")
    ds = load_dataset(info["source"], recorded_inputs(info), num_classes=info["num_classes"], seed=info["seed"],
                      val_fraction=info["val_fraction"], test_fraction=info["test_fraction"], limit=info.get("limit"),
                      classes=tuple(info["classes"]) if info.get("classes") else None, per_class=info.get("per_class"),
                      normalization=recorded_normalizations(info) if info.get("normalization_given") else None)
    if ds.info["fingerprint"] != info["fingerprint"]:
        raise DataError(
            f"the data at {info['source']} changed since this run was made "
            f"(fingerprint {ds.info['fingerprint']} != recorded {info['fingerprint']}); retrain or point --data at the original"
        )
    return ds
