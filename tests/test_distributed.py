"""`onnxpipe train --nproc N`: DDP over gloo on the CPU.

One 2-process run, killed after its first checkpoint and resumed with --resume, must end where the
single-process run with the same global batch and seed ends (same shuffles, the same augmentation,
the gradient of the same global-batch mean; optimizer and schedule restored from the checkpoint),
and only rank 0 may have written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from onnxpipe.cli import app
from onnxpipe.orchestrate import prepare_run
from onnxpipe.runfolder import Run
from onnxpipe.stages.train import TrainConfig, train

LIMIT = 400
# The CLI flags below and TRAIN must describe the same training.
TRAIN = TrainConfig(epochs=3, lr=3e-3, batch_size=32, patience=3, augment_shift=1)
CLI_TRAIN = ["--limit", str(LIMIT), "--epochs", "3", "--lr", "3e-3", "--batch-size", "32", "--patience", "3", "-q"]


def weights(root: Path) -> dict:
    return torch.load(Run.open(root).path("torch"), weights_only=True)["state_dict"]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def kill_after_first_checkpoint(cmd: list[str], ckpt: Path) -> int:
    """Start `cmd` in its own process group, SIGKILL the group (launcher and ranks) as soon as the
    checkpoint appears; returns the epoch the checkpoint holds."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode()
    assert ckpt.exists(), f"no checkpoint was written:\n{out}"
    return torch.load(ckpt, weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process run, 2-process run killed after epoch k and resumed, k)."""
    base = tmp_path_factory.mktemp("ddp")
    single, ds = prepare_run("cnn", base / "single", limit=LIMIT)
    train(single, TRAIN, ds, progress=False)

    ddp = base / "ddp"
    config = base / "train.json"
    config.write_text(json.dumps({"train": {"augment_shift": TRAIN.augment_shift}}))
    cli = ["train", "cnn", "--run", str(ddp), "--nproc", "2", "--config", str(config), *CLI_TRAIN]
    killed_at = kill_after_first_checkpoint([sys.executable, "-m", "onnxpipe.cli", *cli], ddp / "checkpoints" / "last.pt")
    assert not (ddp / "model.pt").exists()
    result = CliRunner().invoke(app, [*cli, "--resume"])
    assert result.exit_code == 0, result.output
    return single.root, ddp, killed_at


def test_killed_run_resumes_from_its_checkpoint(runs):
    _, ddp, killed_at = runs
    assert 1 <= killed_at < TRAIN.epochs, f"the run finished (epoch {killed_at}) before it could be killed"
    t = Run.open(ddp).manifest["training"]
    assert t["resumed_from_epoch"] == killed_at and t["processes"] == 2
    assert [h["epoch"] for h in t["history"]] == [1, 2, 3]


def test_two_processes_follow_one_process(runs):
    single, ddp = (Run.open(r) for r in runs[:2])
    assert single.manifest["training"]["processes"] == 1
    acc1, acc2 = single.metrics("torch")["accuracy"], ddp.metrics("torch")["accuracy"]
    assert acc1 > 0.7  # it learned something, so the comparison means something
    assert abs(acc1 - acc2) <= 0.02, (acc1, acc2)
    for h1, h2 in zip(single.manifest["training"]["history"], ddp.manifest["training"]["history"], strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-3, abs=1e-4)
        assert abs(h2["val_accuracy"] - h1["val_accuracy"]) <= 0.02
    # Same shuffles, same augmentation, same global-batch gradient, exact resume: float rounding only.
    assert max_weight_diff(single.root, ddp.root) < 1e-3


def test_only_rank_zero_writes(runs):
    _, ddp, _ = runs
    files = sorted(str(p.relative_to(ddp)) for p in ddp.rglob("*") if p.is_file())
    assert files == ["checkpoints/last.pt", "manifest.json", "model.pt"]
    ck = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == TRAIN.epochs and len(ck["history"]) == TRAIN.epochs


def test_user_errors_reach_the_command_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "cnn", "--nproc", "2", "--device", "cuda", "--run", str(tmp_path / "x")])
    assert r.exit_code == 1
    if not torch.cuda.is_available():
        assert "needs 2 GPU(s)" in r.output
    run, _ = prepare_run("cnn", tmp_path / "fresh", limit=LIMIT)  # a run folder without a checkpoint
    r = runner.invoke(app, ["train", "cnn", "--run", str(run.root), "--nproc", "2", "--resume", *CLI_TRAIN])
    assert r.exit_code == 1 and "nothing to resume" in r.output, r.output
