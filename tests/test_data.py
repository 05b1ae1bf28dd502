"""Data sources: digits, MNIST IDX (gzipped and raw, written here per the IDX format), npz; bad data errors."""
import gzip
import struct

import numpy as np
import pytest

from onnxpipe.core.data import load_dataset, read_idx, reload_dataset, stratified_split
from onnxpipe.errors import DataError


def write_idx(path, array: np.ndarray, gz: bool = False, magic: bytes | None = None):
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def fake_mnist(folder, n_train=60, n_test=20, gz=False, size=28):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    sfx = ".gz" if gz else ""
    y_tr, y_te = np.arange(n_train) % 10, np.arange(n_test) % 10
    # class-dependent images so the content is checkable
    x_tr = (rng.integers(0, 50, (n_train, size, size)) + y_tr[:, None, None] * 20).astype(np.uint8)
    x_te = (rng.integers(0, 50, (n_test, size, size)) + y_te[:, None, None] * 20).astype(np.uint8)
    write_idx(folder / f"train-images-idx3-ubyte{sfx}", x_tr, gz)
    write_idx(folder / f"train-labels-idx1-ubyte{sfx}", y_tr, gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", x_te, gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", y_te, gz)
    return x_tr, y_tr, x_te, y_te


def test_digits_split_shapes_and_normalization():
    ds = load_dataset("digits", "image")
    n = len(ds.x_train) + len(ds.x_val) + len(ds.x_test)
    assert n == 1797 and len(ds.x_test) == 360
    assert ds.x_train.first.shape[1:] == (1, 28, 28) and ds.x_train.first.dtype == np.float32
    assert abs(ds.x_train.first.mean()) < 1e-4 and abs(ds.x_train.first.std() - 1) < 1e-3
    assert set(np.unique(ds.y_test)) == set(range(10))  # stratified
    seq = load_dataset("digits", "sequence")
    assert seq.x_train.first.shape[1:] == (8, 8)
    assert ds.info["split"] == seq.info["split"]  # same seed, same split for both families


def test_split_is_seeded_and_disjoint():
    y = np.arange(200) % 10
    a = stratified_split(y, (0.7, 0.1), seed=3)
    b = stratified_split(y, (0.7, 0.1), seed=3)
    c = stratified_split(y, (0.7, 0.1), seed=4)
    assert all((p == q).all() for p, q in zip(a, b))
    assert not all((p == q).all() for p, q in zip(a, c))
    allidx = np.concatenate(a)
    assert len(allidx) == 200 and len(np.unique(allidx)) == 200
    assert [len(p) for p in a] == [140, 20, 40]


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_gzipped_and_raw(tmp_path, gz):
    x_tr, y_tr, x_te, y_te = fake_mnist(tmp_path / "m", gz=gz)
    ds = load_dataset(f"mnist:{tmp_path / 'm'}", "sequence")
    assert len(ds.x_test) == 20 and (ds.y_test == y_te).all()  # t10k is the test split
    assert len(ds.x_train) + len(ds.x_val) == 60
    norm = ds.info["normalization"]
    restored = (ds.x_test.first * norm["std"] + norm["mean"]) / norm["scale"]
    np.testing.assert_allclose(restored, x_te, atol=1e-3)
    img = load_dataset(f"mnist:{tmp_path / 'm'}", "image")
    assert img.x_train.first.shape[1:] == (1, 28, 28)


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)


def test_bad_idx_magic(tmp_path):
    fake_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "train-images-idx3-ubyte", np.zeros((60, 28, 28)), magic=b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="bad magic number 12340803"):
        load_dataset(f"mnist:{tmp_path / 'm'}", "image")


def test_idx_truncated(tmp_path):
    a = np.zeros((3, 4, 4), np.uint8)
    write_idx(tmp_path / "t", a)
    data = (tmp_path / "t").read_bytes()
    (tmp_path / "t").write_bytes(data[:-5])
    with pytest.raises(DataError, match="holds 43 bytes"):
        read_idx(tmp_path / "t")


def test_mnist_count_mismatch(tmp_path):
    fake_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.arange(59) % 10)
    with pytest.raises(DataError, match="60 images but 59 labels"):
        load_dataset(f"mnist:{tmp_path / 'm'}", "image")


def test_mnist_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train\\*images\\* file"):
        load_dataset(f"mnist:{tmp_path / 'empty'}", "image")


def test_npz_source_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (100, 16, 16)).astype(np.uint8)
    y = np.arange(100) % 10
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'ok.npz'}", "image")
    assert ds.x_train.first.shape[1:] == (1, 28, 28)  # resized to the CNN's input
    assert ds.info["normalization"]["scale"] == pytest.approx(1 / 255)

    np.savez(tmp_path / "labels.npz", x=x, y=y + 5)
    with pytest.raises(DataError, match=r"labels out of range \[5, 14\].*--set num_classes=15"):
        load_dataset(f"npz:{tmp_path / 'labels.npz'}", "image")
    np.savez(tmp_path / "count.npz", x=x, y=y[:90])
    with pytest.raises(DataError, match="x has 100 samples but y has 90"):
        load_dataset(f"npz:{tmp_path / 'count.npz'}", "image")
    np.savez(tmp_path / "shape.npz", x=x.reshape(100, 256), y=y)
    with pytest.raises(DataError, match=r"x has shape \(100, 256\)"):
        load_dataset(f"npz:{tmp_path / 'shape.npz'}", "sequence")
    np.savez(tmp_path / "names.npz", images=x, labels=y)
    with pytest.raises(DataError, match="arrays named 'x' and 'y'"):
        load_dataset(f"npz:{tmp_path / 'names.npz'}", "image")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}", "image")
    with pytest.raises(DataError, match="unknown data source 'cifar'"):
        load_dataset("cifar", "image")


def test_reload_detects_changed_source(tmp_path):
    x = np.random.default_rng(0).random((50, 8, 8)).astype(np.float32)
    y = np.arange(50) % 10
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", "sequence")
    again = reload_dataset(ds.info)
    np.testing.assert_array_equal(again.x_test.first, ds.x_test.first)
    np.savez(tmp_path / "d.npz", x=x * 2, y=y)
    with pytest.raises(DataError, match="changed since this run was made"):
        reload_dataset(ds.info)
