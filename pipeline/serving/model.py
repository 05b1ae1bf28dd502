"""The served model: one variant of a run, loaded only after its sha256 matched the manifest and a
start-up self-test reproduced the run's recorded reference outputs within the parity policy.

Everything here reads the manifest and the ONNX session, never the PyTorch model: the server starts
without importing torch."""
from __future__ import annotations

import logging
import math
import threading
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..core.data import Rows
from ..core.parity import compare_tensor, rows_are_independent
from ..core.policy import POLICY
from ..core.runtime import Session, SessionSetting, make_session, resolve_providers
from ..errors import ArtifactError, ConfigError, DeviceError, OnnxpipeError
from ..runfolder import Run
from .protocol import ORT_TO_V2, InferRequest, RequestError

log = logging.getLogger("onnxpipe.serve")


def _finite_or_none(v):
    """JSON has no infinity or NaN: such a number is reported as null (the detail text says what it was)."""
    return v if not isinstance(v, float) or math.isfinite(v) else None


@dataclass(frozen=True)
class TensorMeta:
    """One model input or output as the protocol shows it: -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class SelfTest:
    rule: str                 # "tensor" (lossless variant) or "task" (lossy variant)
    passed: bool
    samples: int
    max_abs: float
    agreement: float
    detail: str

    def to_json(self) -> dict:
        return {k: _finite_or_none(v) for k, v in self.__dict__.items()}


def _metas(ort_args) -> list[TensorMeta]:
    out = []
    for a in ort_args:
        datatype = ORT_TO_V2.get(a.type, a.type)
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape)
        out.append(TensorMeta(a.name, datatype, shape))
    return out


@dataclass
class ServedModel:
    """A run's variant behind the server. `state` goes loading -> ready, or loading -> failed (with `error`)."""

    run: Run
    variant: str
    name: str
    device: str = "auto"
    threads: int | None = None
    version: str = "1"
    execution_mode: str = "sequential"
    setting_from: str = "the server's settings"   # where threads / execution mode came from, for the start-up log
    state: str = "loading"
    error: str | None = None
    session: Session | None = None
    inputs: list[TensorMeta] = field(default_factory=list)
    outputs: list[TensorMeta] = field(default_factory=list)
    self_test: SelfTest | None = None
    vocab_size: int = 0
    row_independent: bool = True    # False: outputs of a row depend on its batch; the batcher never merges callers
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def prepare(cls, run: Run, variant: str | None = None, *, device: str = "auto", threads: int | None = None,
                name: str | None = None, version: str = "1") -> "ServedModel":
        """Cheap checks that decide whether serving can start at all (raise OnnxpipeError): the variant
        exists and is an ONNX model, and the requested device has a provider."""
        variant = variant or run.selected
        if not variant:
            raise ConfigError(f"run {run.root} has no selected variant yet; pass --variant (it has: "
                              f"{', '.join(run.variants()) or 'none'}) or run `onnxpipe export {run.root}` first")
        art = run.artifact(variant)
        if art.format != "onnx":
            onnx = [v for v in run.variants() if run.artifact(v).format == "onnx"]
            raise ConfigError(f"variant {variant!r} is a {art.format} model; serve an ONNX variant "
                              f"({', '.join(onnx) or 'none yet: run `onnxpipe export`'})")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        resolve_providers(device)  # a --device cuda without a CUDA provider stops here, before the port opens
        # a real config field as recorded, not a derived default; read without the model library (torch), whose
        # hundreds of thousands of objects would make every full garbage collection of the server take ~0.1 s
        vocab = run.recorded_model_config(variant).get("vocab_size", 0)
        mode, source = "sequential", "the server's settings" if threads is not None else "default: every usable core"
        recorded = run.metrics(variant).get("session_setting")
        if threads is None and recorded:  # what `onnxpipe select` measured fastest for this variant on this machine
            chosen = SessionSetting.from_json(recorded)
            threads, mode, source = chosen.threads, chosen.execution_mode, "chosen by `onnxpipe select`"
        return cls(run=run, variant=variant, name=name or run.model_name, device=device, threads=threads,
                   version=str(version), vocab_size=int(vocab or 0), execution_mode=mode, setting_from=source)

    # --- loading -------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def load(self) -> None:
        """sha256 check, session, self-test. Sets state ready or failed (with the reason); never stays
        "loading". Raises only DeviceError (a device that cannot run the model: the server must stop)."""
        try:
            path = self.run.path(self.variant)           # inside the run folder, sha256 against the manifest
            # no spinning: idle ORT threads would busy-wait on the cores the event loop needs
            session = make_session(path, device=self.device, threads=self.threads, spinning=False,
                                   execution_mode=self.execution_mode)
            self.inputs, self.outputs = _metas(session.inner.get_inputs()), _metas(session.inner.get_outputs())
            self.session = session
            log.info("loaded %s variant %s (%s, sha256 ok); providers: %s", self.name, self.variant, path.name,
                     ", ".join(session.providers))
            if self.device == "auto":
                log.info("--device auto picked %s", session.device)
            self.self_test = self._run_self_test()
            if not self.self_test.passed:
                raise ArtifactError(f"start-up self-test failed: {self.self_test.detail}; the variant does not "
                                    f"reproduce the run's reference outputs; re-run `onnxpipe verify {self.run.root}`")
            log.info("self-test passed (%s rule, %d reference inputs): %s", self.self_test.rule,
                     self.self_test.samples, self.self_test.detail)
            self._check_rows()
            self.state = "ready"
        except DeviceError as e:
            self.state, self.error = "failed", str(e)
            raise
        except Exception as e:  # onnxpipe's own errors, and anything a graph or a damaged file raises
            msg = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
            self.state, self.error = "failed", msg if isinstance(e, OnnxpipeError) else f"{type(e).__name__}: {msg}"
            log.error("model %s is NOT ready: %s", self.name, self.error)
        finally:
            self._ready.set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _reference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
        remake = (f"`onnxpipe export {self.run.root}` (or `onnxpipe import MODEL.onnx --data ...` for an imported "
                  "model) records one")
        ref = self.run.section("reference")
        if not ref:
            raise ArtifactError(f"run {self.run.root} has no reference outputs (reference.npz) for the start-up "
                                f"self-test; {remake}")
        path = self.run.checked_file(ref["path"], ref["sha256"], what="reference file", remake=remake)
        try:
            with np.load(path, allow_pickle=False) as z:
                labels = z["labels"] if "labels" in z.files else None
                return Rows.from_npz(z, ref.get("inputs")), z["outputs"], labels, ref.get("variant", "torch")
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ArtifactError(f"reference file {path} cannot be read ({e}); {remake}") from None

    def _check_rows(self) -> None:
        """Does a row's answer depend on the other rows of its batch? Then callers are never co-batched."""
        x = self._reference()[0][:8]
        if len(x) < 2:
            return
        self.row_independent, moved = rows_are_independent(lambda *a: self.session.run(*a)[0], x.arrays, POLICY.tensor)
        if not self.row_independent:
            log.warning("variant %s computes over the whole batch (a row's logits moved by %.3g when the other rows "
                        "changed; dynamic INT8 does this): requests are never batched across callers",
                        self.variant, moved)

    def _run_self_test(self) -> SelfTest:
        """Replay the reference inputs (as one batch and one row at a time) and judge them by the rule verify
        used: the tensor tolerance for a lossless variant, the budget recorded along its lineage for a lossy one."""
        x, want, _labels, ref_variant = self._reference()
        got = np.asarray(self.session.run(*x.arrays)[0], np.float32)
        rows = np.concatenate([np.asarray(self.session.run(*x[i].arrays)[0], np.float32) for i in range(len(x))])
        finite = bool(np.all(np.isfinite(got)) and np.all(np.isfinite(rows)))
        tol = POLICY.tensor
        shape = list(x.first.shape)
        check = compare_tensor(want, got, output=self.outputs[0].name, shape=shape, atol=tol.atol, rtol=tol.rtol)
        rowcheck = compare_tensor(want, rows, output=self.outputs[0].name, shape=shape, atol=tol.atol, rtol=tol.rtol)
        agreement = float(min((want.argmax(1) == got.argmax(1)).mean(), (want.argmax(1) == rows.argmax(1)).mean()))
        max_abs = max(check.max_abs, rowcheck.max_abs)
        if self.run.has(ref_variant) and self.run.is_lossy(ref_variant, self.variant):
            budget = POLICY.budget_between(self.run, ref_variant, self.variant)
            passed = finite and agreement >= budget.min_agreement
            detail = (f"top-1 agreement with {ref_variant} {agreement:.3f} over {len(x)} rows (budget >= "
                      f"{budget.min_agreement}, as recorded along its lineage), logits max abs {max_abs:.3g} "
                      "(lossy variant: reported, not gated)")
            if not finite:
                detail += "; outputs hold NaN or Inf"
            return SelfTest("task", passed, len(x), max_abs, agreement, detail)
        passed = finite and check.passed and rowcheck.passed
        detail = f"max abs {max_abs:.3g} vs {ref_variant} (atol {tol.atol:g}, rtol {tol.rtol:g})"
        if not finite:
            detail += "; outputs hold NaN or Inf"
        return SelfTest("tensor", passed, len(x), max_abs, agreement, detail)

    # --- requests ------------------------------------------------------------------------------------
    def feeds(self, req: InferRequest) -> list[np.ndarray]:
        """The request's inputs in the model's order, checked against the model (RequestError if not)."""
        given = {t.name: t for t in req.inputs}
        wanted = [m.name for m in self.inputs]
        missing = [n for n in wanted if n not in given]
        extra = [n for n in given if n not in wanted]
        if missing or extra:
            parts = ([f"missing input(s) {', '.join(map(repr, missing))}"] if missing else []) + \
                    ([f"unknown input(s) {', '.join(map(repr, extra))}"] if extra else [])
            raise RequestError(f"{'; '.join(parts)}; model {self.name!r} takes {self._describe_inputs()}")
        arrays, batch = [], None
        for meta in self.inputs:
            t = given[meta.name]
            where = f"input {meta.name!r}"
            if t.datatype != meta.datatype:
                raise RequestError(f"{where} has datatype {t.datatype} but model {self.name!r} takes {meta.datatype}")
            if len(t.shape) != len(meta.shape) or any(m not in (-1, s) for m, s in zip(meta.shape, t.shape)):
                raise RequestError(f"{where} has shape {list(t.shape)} but model {self.name!r} takes "
                                   f"{list(meta.shape)} (-1: any size)")
            if t.shape and t.shape[0] == 0:
                raise RequestError(f"{where} is an empty batch (shape {list(t.shape)}); send at least one row")
            if any(s == 0 for s, m in zip(t.shape, meta.shape) if m == -1):
                raise RequestError(f"{where} has a zero-length dimension (shape {list(t.shape)}); every dimension "
                                   "must be >= 1")
            if batch is not None and t.shape[0] != batch:
                raise RequestError(f"inputs disagree on the batch size: {where} has {t.shape[0]} rows, others {batch}")
            batch = t.shape[0] if t.shape else batch
            a = t.array
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                bad = int(a.size - np.isfinite(a).sum())
                raise RequestError(f"{where} holds {bad} NaN or Inf value(s); model {self.name!r} needs finite numbers")
            if self.vocab_size and a.dtype.kind in "iu" and a.size and (a.min() < 0 or a.max() >= self.vocab_size):
                raise RequestError(f"{where} holds token ids outside [0, {self.vocab_size - 1}] "
                                   f"(min {a.min()}, max {a.max()}); the model's vocabulary has {self.vocab_size} tokens")
            arrays.append(a)
        if req.outputs is not None:
            known = {m.name for m in self.outputs}
            unknown = [n for n in req.outputs if n not in known]
            if unknown:
                raise RequestError(f"unknown output(s) {', '.join(map(repr, unknown))}; model {self.name!r} "
                                   f"has {', '.join(sorted(known))}")
        return arrays

    def _describe_inputs(self) -> str:
        return ", ".join(f"{m.name} ({m.datatype} {list(m.shape)})" for m in self.inputs)

    def run_batch(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One ONNX Runtime call (the batcher's worker thread calls this)."""
        feeds = {m.name: a for m, a in zip(self.inputs, arrays)}
        return self.session.inner.run(None, feeds)

    def metadata(self) -> dict:
        params = {"variant": self.variant, "run": str(self.run.root), "state": self.state}
        if self.session is not None:
            params.update(providers=list(self.session.providers), device=self.session.device,
                          threads=self.session.threads,
                          sha256=self.run.artifact(self.variant).sha256)
        if self.self_test is not None:
            params["self_test"] = self.self_test.to_json()
            params["batched_across_callers"] = self.row_independent
        if self.error:
            params["error"] = self.error
        return {"name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
                "inputs": [m.to_json() for m in self.inputs], "outputs": [m.to_json() for m in self.outputs],
                "parameters": params}

