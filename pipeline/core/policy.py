"""The parity policy: every tolerance, budget, gate and verdict word in one object (DESIGN.md).

    lossless steps   torch -> onnx, onnx -> onnx_opt, CPU EP -> CUDA EP at fp32: tensor tolerance
                     (every element within atol + rtol * |ref|) over a grid of input shapes
    lossy steps      INT8, FP16 against their FP32 parent: task budget on held-out data (accuracy
                     drop in points, top-1 agreement), tensor statistics reported beside them
    gated steps      a student or a pruned model against its teacher: a budget that decides whether
                     the variant may be *selected*; missing it keeps the variant on disk, never
                     selected, and is not a broken artifact (verify does not fail on it)

Stages, the CLI's defaults and the serving self-test all read POLICY (or `policy_for(spec)`, which
applies a model's own overrides), and every verdict is worded by `verdict_word`. A budget a stage used
is recorded with its artifact (extra.budget), so later checks (verify, the self-test) judge the variant
by the same numbers along its lineage (`budget_between`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import ConfigError

PASS, OVER_BUDGET, FAIL = "pass", "over budget", "FAIL"
# An accuracy delta whose interval holds 0 (or whose McNemar test cannot reject "no difference").
NOT_DISTINGUISHABLE = "not distinguishable from 0"


def verdict_word(passed: bool, gate: bool = False) -> str:
    """The one wording of a verdict: pass, over budget (a missed selection gate), FAIL."""
    return PASS if passed else (OVER_BUDGET if gate else FAIL)


def entry_verdict(entry: dict) -> str:
    """The verdict word of a parity entry as recorded in the manifest."""
    return verdict_word(bool(entry.get("passed")), bool(entry.get("gate")))


@dataclass(frozen=True)
class Tolerance:
    """Lossless steps: |candidate - reference| <= atol + rtol * |reference| for every element."""

    atol: float = 1e-4
    rtol: float = 1e-3

    def __post_init__(self):
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class Budget:
    """How far a lossy variant may drift: accuracy points lost, top-1 agreement kept; `gate` marks a
    selection gate (over budget: kept, never selected) rather than a broken artifact."""

    max_accuracy_drop: float = 1.0      # points (percent) of test accuracy
    min_agreement: float = 0.99         # fraction of test samples with the reference's top-1 class
    gate: bool = False

    def __post_init__(self):
        if not isinstance(self.max_accuracy_drop, (int, float)) or not math.isfinite(self.max_accuracy_drop) \
                or self.max_accuracy_drop < 0:
            raise ConfigError(f"--max-drop must be >= 0 accuracy points, got {self.max_accuracy_drop}")
        if not isinstance(self.min_agreement, (int, float)) or not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"--min-agreement must be between 0 and 1, got {self.min_agreement}")

    def to_json(self) -> dict:
        d = {"max_accuracy_drop": self.max_accuracy_drop, "min_agreement": self.min_agreement}
        if self.gate:
            d["gate"] = True
        return d

    @classmethod
    def from_json(cls, record: dict) -> "Budget":
        return cls(float(record.get("max_accuracy_drop", cls.max_accuracy_drop)),
                   float(record.get("min_agreement", cls.min_agreement)), bool(record.get("gate", False)))


@dataclass(frozen=True)
class Uncertainty:
    """How an accuracy delta's uncertainty is reported (information beside the budget, never a gate): a
    paired bootstrap interval over the test rows (seeded, so the same rows give the same interval) and the
    exact McNemar test on the rows where the two models disagree about correctness."""

    confidence: float = 0.95
    resamples: int = 10_000
    seed: int = 0

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


@dataclass(frozen=True)
class ParityPolicy:
    tensor: Tolerance = field(default_factory=Tolerance)
    lossy: Budget = field(default_factory=Budget)                               # INT8 / FP16 vs their parent
    student: Budget = field(default_factory=lambda: Budget(1.5, 0.0, gate=True))  # student / pruned vs teacher
    batches: tuple[int, ...] = (1, 7, 64)      # the shape grid's batch sizes (sequence lengths: 1, T, 2T)
    reference_rows: int = 128                  # test rows in reference.npz, replayed by the serving self-test
    chance_margin_pt: float = 5.0              # a root within this many points of chance accuracy is warned about
    uncertainty: Uncertainty = field(default_factory=Uncertainty)

    def with_overrides(self, overrides: dict | None) -> "ParityPolicy":
        """This policy with a model's own settings: atol, rtol, max_accuracy_drop, min_agreement,
        student_max_accuracy_drop (unknown keys are an error naming the valid ones)."""
        if not overrides:
            return self
        known = {"atol", "rtol", "max_accuracy_drop", "min_agreement", "student_max_accuracy_drop"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown parity override(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        tensor = dataclasses.replace(self.tensor, **{k: overrides[k] for k in ("atol", "rtol") if k in overrides})
        lossy = dataclasses.replace(self.lossy, **{k: overrides[k] for k in ("max_accuracy_drop", "min_agreement")
                                                   if k in overrides})
        student = self.student
        if "student_max_accuracy_drop" in overrides:
            student = dataclasses.replace(student, max_accuracy_drop=overrides["student_max_accuracy_drop"])
        return dataclasses.replace(self, tensor=tensor, lossy=lossy, student=student)

    def budget_between(self, run, reference: str, candidate: str) -> Budget:
        """The budget that judges `candidate` against `reference`: the one recorded along the lineage
        (run.budget_for), else this policy's default for lossy steps."""
        recorded = run.budget_for(candidate, reference)
        return Budget.from_json(recorded) if recorded else self.lossy

    def near_chance(self, accuracy: float | None, num_classes: int | None) -> bool:
        """True when a root model's accuracy is within chance_margin_pt points of guessing."""
        if accuracy is None or not num_classes:
            return False
        return 100.0 * (accuracy - 1.0 / num_classes) < self.chance_margin_pt


POLICY = ParityPolicy()


def policy_for(spec) -> ParityPolicy:
    """POLICY with the model spec's own overrides (ModelSpec.parity), if it declares any."""
    return POLICY.with_overrides(getattr(spec, "parity", None))
