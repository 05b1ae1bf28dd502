"""Shared fixtures: tiny trained runs (a few epochs on a digits subset), built once per session.

Tests that change a run must work on a copy: `copy_run(tiny_run("cnn"), tmp_path)`."""
from __future__ import annotations

import contextlib
import shutil
import threading
from pathlib import Path

import pytest

import onnxpipe.models  # noqa: F401  (registers the built-in models)

TINY_TRAIN = {"epochs": 3, "lr": 3e-3, "patience": 3}
TINY_LIMIT = 400


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where ONNX Runtime has a CUDA provider."""
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA: onnxruntime-gpu and an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """tiny_run(model) -> Path of a run folder with variants torch and onnx, made once per session."""
    from onnxpipe.orchestrate import Context, run_model

    cache: dict[str, Path] = {}

    def make(model: str) -> Path:
        if model not in cache:
            root = tmp_path_factory.mktemp("runs") / model
            ctx = Context(limit=TINY_LIMIT, progress=False, sections={"train": dict(TINY_TRAIN)})
            run_model(model, root, ctx, stages=["train", "export"])
            cache[model] = root
        return cache[model]

    return make


def edit_manifest(root: Path, fn) -> None:
    """Change manifest.json on disk as a person or another tool would (tests of tampered or odd run folders)."""
    import json

    path = Path(root) / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m, indent=2))


@pytest.fixture(scope="session")
def edit():
    """edit_manifest as a fixture: edit(root, fn) applies fn to the manifest dict on disk."""
    return edit_manifest


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def copy_run_to():
    """copy_run as a fixture, for module-scoped fixtures (tests cannot import conftest as a module)."""
    return copy_run


@pytest.fixture
def copy_of(tiny_run, tmp_path):
    """copy_of(model) -> a private copy of the tiny run, safe to modify."""
    return lambda model: copy_run(tiny_run(model), tmp_path)


USERS_MODELS = Path(__file__).parent / "users_models.py"


@pytest.fixture
def two_inputs(tmp_path):
    """(factory reference prefix, npz data) for the two-input models of tests/users_models.py: the digits as
    rows (N, 8, 8) and their means (N, 8). Use f"{prefix}:two_dense_inputs" or f"{prefix}:two_inputs"."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(tmp_path / "two.npz", rows=d.images, aux=d.images.mean(1), y=d.target)
    return str(USERS_MODELS), f"npz:{tmp_path / 'two.npz'}"


@contextlib.contextmanager
def _held_model_calls(batcher):
    real, gate, calls = batcher.run_batch, threading.Event(), []

    def held(arrays):
        calls.append(len(arrays[0]))
        gate.wait(30)
        return real(arrays)

    batcher.run_batch = held
    try:
        yield gate, calls
    finally:
        gate.set()
        batcher.run_batch = real


@pytest.fixture
def hold_model_calls():
    """hold_model_calls(batcher) -> a context yielding (gate, calls): every model call of the server's batcher
    waits for `gate` (the real ONNX Runtime call runs once it opens) and `calls` lists the rows of each call;
    on leaving, the gate opens and the batcher gets its real call back."""
    return _held_model_calls
