"""Artifacts and exported files get the usual permissions (0666 less the umask), not tempfile's 0600:
a server running as another user, or a container, can read what onnxpipe wrote."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from onnxpipe.atomic import atomic_path, write_bytes, write_json


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def current_umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_bytes(tmp_path / "a.bin", b"x")
        write_json(tmp_path / "sub" / "m.json", {"a": 1})
        with atomic_path(tmp_path / "c.onnx") as tmp:
            shutil.copyfile(tmp_path / "a.bin", tmp)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert {p.name: mode(p) for p in (tmp_path / "a.bin", tmp_path / "sub" / "m.json", tmp_path / "c.onnx")} == \
        {"a.bin": want, "m.json": want, "c.onnx": want}
    assert mode(tmp_path / "sub") == 0o777 & ~umask
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_real_run_folder_and_a_triton_export_are_readable_by_others(tiny_run, tmp_path):
    """The session's tiny run (train + export) and `onnxpipe export-triton` in another process with umask 002."""
    root = tiny_run("cnn")
    want = 0o666 & ~current_umask()
    for name in ("manifest.json", "model.pt", "model.onnx", "reference.npz"):
        assert mode(root / name) == want, name
    out = tmp_path / "repo"
    r = subprocess.run(["sh", "-c", f'umask 002 && exec "{sys.executable}" -m onnxpipe.cli export-triton "{root}" "{out}"'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert mode(out / "cnn" / "config.pbtxt") == 0o664 and mode(out / "cnn" / "1" / "model.onnx") == 0o664
    assert mode(out / "cnn" / "1") == 0o775
