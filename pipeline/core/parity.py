"""Parity checks. A comparison returns a report; the caller decides (and raises ParityError).

Two rules (the numbers live in pipeline/core/policy.py):
  tensor  lossless steps: every element within atol + rtol*|ref|, over a grid of input shapes
  task    lossy steps: top-1 agreement and accuracy drop on held-out data, tensor stats beside them

Every accuracy delta between two models scored on the same test rows (a lossy variant's drop, a distilled,
pruned or transferred model's gain over its twin) carries its uncertainty (`paired_delta`): a seeded paired
bootstrap interval over the rows and the exact McNemar test on the rows where the two disagree about
correctness. These are information beside the budget; the budget keeps deciding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .policy import NOT_DISTINGUISHABLE, POLICY, Budget, Uncertainty, verdict_word


# --- uncertainty of an accuracy delta --------------------------------------------------------------------

def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference" each of the n = a_only + b_only discordant rows
    goes either way with probability 1/2, so p = min(1, 2 * P[Binomial(n, 1/2) <= min(a_only, b_only)])."""
    n, k = int(a_only) + int(b_only), min(int(a_only), int(b_only))
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def bootstrap_interval(a_only: int, b_only: int, n: int, *, confidence: float, resamples: int,
                       seed: int) -> tuple[float, float]:
    """Percentile interval (points) of accuracy(a) - accuracy(b) under the paired bootstrap over n test rows.

    Resampling rows with replacement only changes how many rows of each kind are drawn (a right and b wrong:
    +1, the reverse: -1, the rest: 0), so the resampled counts are drawn as one multinomial per resample:
    the same distribution as resampling row indices, at a fraction of the cost."""
    if n <= 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    rest = n - a_only - b_only
    counts = rng.multinomial(n, [a_only / n, b_only / n, rest / n], size=resamples)
    deltas = 100.0 * (counts[:, 0] - counts[:, 1]) / n
    alpha = 1.0 - confidence
    lo, hi = np.percentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Delta:
    """accuracy(a) - accuracy(b) in points on the same test rows, with its interval and McNemar p-value."""

    delta_pt: float
    low_pt: float
    high_pt: float
    a_only: int          # rows a gets right and b gets wrong
    b_only: int          # rows b gets right and a gets wrong
    rows: int
    p_value: float
    confidence: float = 0.95
    resamples: int = 0
    seed: int = 0

    @property
    def distinguishable(self) -> bool:
        """Whether the delta is told apart from 0: the interval excludes 0 and McNemar rejects "no difference"
        at the same level (both must agree)."""
        return not (self.low_pt <= 0.0 <= self.high_pt) and self.p_value < 1.0 - self.confidence

    def words(self, signed: bool = True) -> str:
        """e.g. '+0.28 pt [95% CI -0.56, +1.11], McNemar p=0.69: not distinguishable from 0'."""
        f = "+.2f" if signed else ".2f"
        text = (f"{self.delta_pt:{f}} pt [{100 * self.confidence:.0f}% CI {self.low_pt:{f}}, {self.high_pt:{f}}], "
                f"McNemar p={self.p_value:.2g}")
        return text + ("" if self.distinguishable else f": {NOT_DISTINGUISHABLE}")

    def to_json(self) -> dict:
        return {"delta_pt": self.delta_pt, "ci_pt": [self.low_pt, self.high_pt], "confidence": self.confidence,
                "a_only": self.a_only, "b_only": self.b_only, "rows": self.rows, "mcnemar_p": self.p_value,
                "resamples": self.resamples, "seed": self.seed, "distinguishable": self.distinguishable}

    @classmethod
    def from_json(cls, d: dict) -> "Delta":
        lo, hi = d["ci_pt"]
        return cls(d["delta_pt"], lo, hi, d["a_only"], d["b_only"], d["rows"], d["mcnemar_p"],
                   d.get("confidence", 0.95), d.get("resamples", 0), d.get("seed", 0))


def paired_delta(a_correct, b_correct, settings: Uncertainty | None = None) -> Delta:
    """accuracy(a) - accuracy(b) in points, from per-row correctness (booleans, the same test rows in order)."""
    settings = settings or POLICY.uncertainty
    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_delta needs two per-row vectors of one length, got {a.shape} and {b.shape}")
    n = len(a)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    lo, hi = bootstrap_interval(a_only, b_only, n, confidence=settings.confidence, resamples=settings.resamples,
                                seed=settings.seed)
    return Delta(100.0 * (a_only - b_only) / max(n, 1), lo, hi, a_only, b_only, n, mcnemar_exact(a_only, b_only),
                 settings.confidence, settings.resamples, settings.seed)


def delta_words(entry: dict | None, signed: bool = True) -> str:
    """A recorded delta (Delta.to_json, e.g. a parity entry's "uncertainty") in words; '-' when absent."""
    return "-" if not entry else Delta.from_json(entry).words(signed)


@dataclass
class TensorCheck:
    """One output compared at one input shape."""

    output: str
    shape: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    passed: bool
    worst_index: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ParityReport:
    reference: str
    candidate: str
    rule: str                              # "tensor" or "task"
    checks: list[TensorCheck] = field(default_factory=list)
    atol: float | None = None
    rtol: float | None = None
    # task rule
    agreement: float | None = None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    max_accuracy_drop: float | None = None  # in points (percent)
    min_agreement: float | None = None
    cosine: float | None = None
    # A gate budget decides eligibility for `selected` (e.g. a student against its teacher): missing it
    # keeps the variant out of selection but is not a broken artifact, so it does not fail `verify`.
    gate: bool = False
    notes: list[str] = field(default_factory=list)
    # task rule: the drop's uncertainty (a = reference, b = candidate), information beside the budget
    drop: Delta | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return 100.0 * (self.reference_accuracy - self.candidate_accuracy)

    @property
    def passed(self) -> bool:
        if self.rule == "tensor":
            return bool(self.checks) and all(c.passed for c in self.checks)
        ok = True
        if self.min_agreement is not None:
            ok &= self.agreement is not None and self.agreement >= self.min_agreement
        if self.max_accuracy_drop is not None:
            ok &= self.accuracy_drop is not None and self.accuracy_drop <= self.max_accuracy_drop + 1e-9
        return ok

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.checks), default=0.0)

    def failing(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.passed]

    @property
    def verdict(self) -> str:
        """pass, over budget (a missed selection gate: kept, never selected) or FAIL (policy.verdict_word)."""
        return verdict_word(self.passed, self.gate)

    def budget_line(self) -> str:
        """One line: why a task report passes or misses its budget."""
        parts = []
        if self.agreement is not None:
            op = ">=" if self.agreement >= (self.min_agreement or 0) else "<"
            parts.append(f"agreement {self.agreement:.4f} {op} {self.min_agreement}")
        if self.accuracy_drop is not None:
            op = "<=" if self.accuracy_drop <= (self.max_accuracy_drop or 0) + 1e-9 else ">"
            parts.append(f"accuracy drop {self.accuracy_drop:.2f} pt {op} {self.max_accuracy_drop} pt")
        if self.drop is not None:
            parts.append(f"(drop {self.drop.words(signed=False)})")
        return ("within budget: " if self else "over budget: ") + ", ".join(parts)

    def summary(self) -> str:
        verdict = self.verdict + (" (kept, never selected)" if self.verdict != "pass" and self.gate else "")
        head = f"parity {self.reference} -> {self.candidate} ({self.rule} rule): {verdict}"
        lines = [head]
        if self.rule == "tensor":
            lines.append(f"  tolerance atol={self.atol:g} rtol={self.rtol:g}; max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} "
                         f"over {len(self.checks)} output/shape checks")
            for c in self.failing():
                lines.append(f"  FAIL output {c.output!r} at input shape {c.shape}: max abs {c.max_abs:.3g} "
                             f"(at {c.worst_index}), max rel {c.max_rel:.3g}, mean abs {c.mean_abs:.3g}")
        else:
            lines.append(
                f"  agreement {self.agreement:.4f} (min {self.min_agreement}), accuracy {self.reference_accuracy:.4f} -> "
                f"{self.candidate_accuracy:.4f} (drop {self.accuracy_drop:.2f} pt, budget {self.max_accuracy_drop} pt); "
                f"logits max abs {self.max_abs:.3g}, cosine {self.cosine:.5f}"
            )
            if self.drop is not None:
                lines.append(f"  drop {self.drop.words(signed=False)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = {
            "reference": self.reference, "candidate": self.candidate, "rule": self.rule, "passed": self.passed,
            "max_abs": self.max_abs, "max_rel": self.max_rel,
            "shapes": sorted({tuple(c.shape) for c in self.checks}),
        }
        if self.rule == "tensor":
            d.update(atol=self.atol, rtol=self.rtol, failing=[c.to_json() for c in self.failing()])
        else:
            d.update(agreement=self.agreement, reference_accuracy=self.reference_accuracy,
                     candidate_accuracy=self.candidate_accuracy, accuracy_drop=self.accuracy_drop,
                     max_accuracy_drop=self.max_accuracy_drop, min_agreement=self.min_agreement, cosine=self.cosine,
                     gate=self.gate)
            if self.drop is not None:
                d["uncertainty"] = self.drop.to_json()
        d["shapes"] = [list(s) for s in d["shapes"]]
        if self.notes:
            d["notes"] = self.notes
        return d


def compare_tensor(ref: np.ndarray, cand: np.ndarray, *, output: str, shape, atol: float, rtol: float) -> TensorCheck:
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64)
    if ref.shape != cand.shape:
        return TensorCheck(output, list(shape), float("inf"), float("inf"), float("inf"), False,
                           worst_index=[f"shape {list(cand.shape)} != {list(ref.shape)}"])
    diff = np.abs(ref - cand)
    if not np.all(np.isfinite(cand)):
        diff = np.where(np.isfinite(cand), diff, np.inf)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
    return TensorCheck(
        output=output, shape=[int(s) for s in shape],
        max_abs=float(diff.max()) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        passed=bool(np.all(diff <= atol + rtol * np.abs(ref))),
        worst_index=[int(i) for i in worst],
    )


def grid_sizes(spec, model_cfg, seq_lens: tuple[int, ...] | None = None) -> dict[str, list[int]]:
    """The values every dynamic non-batch axis takes on the grid, by axis name: 1, n and 2n for a sequence
    axis (axis 1 of a sequence, token or mask input; `seq_lens` replaces them), n and 2n for any other."""
    out: dict[str, list[int]] = {}
    for s in spec.input_specs(model_cfg):
        for axis, name in s.dynamic.items():
            if axis == 0 or name in out:
                continue
            n = s.shape[axis - 1]
            sequence_axis = axis == 1 and s.kind in ("sequence", "tokens", "mask", "other")
            if sequence_axis:
                out[name] = list(seq_lens) if seq_lens else sorted({1, n, 2 * n})
            else:
                out[name] = sorted({n, 2 * n})
    return out


def shape_grid(spec, model_cfg, batches=(1, 7, 64), seq_lens: tuple[int, ...] | None = None) -> list[tuple]:
    """Input tuples (numpy, in the model's input order) over the grid: every batch size times the values of
    the dynamic axes (which vary together: the k-th grid point gives each axis its k-th value), with masks
    consistent with lengths (ModelSpec.example_inputs)."""
    names = [s.name for s in spec.input_specs(model_cfg)]
    sizes = grid_sizes(spec, model_cfg, seq_lens)
    points = max((len(v) for v in sizes.values()), default=1)
    grid = []
    for b in batches:
        for k in range(points):
            chosen = {d: values[min(k, len(values) - 1)] for d, values in sizes.items()}
            ex = spec.example_inputs(model_cfg, batch=b, sizes=chosen)
            grid.append(tuple(ex[n].numpy() for n in names))
    return grid


def tensor_parity(reference: str, candidate: str, ref_fn, cand_fn, grid, *, atol: float, rtol: float,
                  output_names=("logits",)) -> ParityReport:
    """Run both functions on every input tuple of the grid and compare every output."""
    report = ParityReport(reference, candidate, "tensor", atol=atol, rtol=rtol)
    for inputs in grid:
        shape = list(inputs[0].shape)
        r = ref_fn(*inputs)
        try:
            c = cand_fn(*inputs)
        except Exception as e:  # ONNX Runtime raises its own types: a graph that fails at a shape is a failed check
            msg = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            report.checks.append(TensorCheck(output_names[0], shape, float("inf"), float("inf"), float("inf"), False,
                                             worst_index=[f"{candidate} fails at this shape: {msg}"]))
            continue
        rs, cs = (r if isinstance(r, (list, tuple)) else [r]), (c if isinstance(c, (list, tuple)) else [c])
        for name, a, b in zip(output_names, rs, cs):
            report.checks.append(compare_tensor(a, b, output=name, shape=shape, atol=atol, rtol=rtol))
    return report


def task_parity(reference: str, candidate: str, ref_logits: np.ndarray, cand_logits: np.ndarray, labels: np.ndarray,
                *, max_accuracy_drop: float, min_agreement: float) -> ParityReport:
    """Agreement, accuracy drop and logit statistics on held-out data."""
    ref_logits = np.asarray(ref_logits, np.float64)
    cand_logits = np.asarray(cand_logits, np.float64)
    check = compare_tensor(ref_logits, cand_logits, output="logits", shape=ref_logits.shape, atol=np.inf, rtol=0)
    num = (ref_logits * cand_logits).sum(1)
    den = np.linalg.norm(ref_logits, axis=1) * np.linalg.norm(cand_logits, axis=1)
    cosine = float(np.mean(num / np.maximum(den, 1e-12)))
    ref_right, cand_right = ref_logits.argmax(1) == labels, cand_logits.argmax(1) == labels
    return ParityReport(
        reference, candidate, "task", checks=[check],
        agreement=float((ref_logits.argmax(1) == cand_logits.argmax(1)).mean()),
        reference_accuracy=float(ref_right.mean()),
        candidate_accuracy=float(cand_right.mean()),
        max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, cosine=cosine,
        drop=paired_delta(ref_right, cand_right),
    )


def judge(budget: Budget, reference: str, candidate: str, ref_logits: np.ndarray, cand_logits: np.ndarray,
          labels: np.ndarray) -> ParityReport:
    """A lossy variant against its reference by `budget` (task rule; a gate budget marks the report)."""
    report = task_parity(reference, candidate, ref_logits, cand_logits, labels,
                         max_accuracy_drop=budget.max_accuracy_drop, min_agreement=budget.min_agreement)
    report.gate = budget.gate
    return report


def row_dependence(fn, inputs, *, scale: float = 100.0) -> float:
    """How far row 0's outputs move when the *other* rows of its batch change (their float inputs scaled by
    `scale`, their integer inputs shifted): 0 for a model whose rows are independent, large for one that computes something over the
    whole batch (dynamic INT8: one activation scale per call). `inputs`: a tuple of batch-first arrays with
    at least 2 rows."""
    inputs = [np.asarray(a) for a in inputs]

    def other_rows_changed(a: np.ndarray) -> np.ndarray:
        if a.dtype.kind == "f":
            return np.concatenate([a[:1], a[1:] * scale]).astype(a.dtype)
        if a.ndim >= 2:   # token ids, masks: the other rows' values shifted along their last axis
            return np.concatenate([a[:1], np.roll(a[1:], 1, axis=-1)])
        return a

    loud = [other_rows_changed(a) for a in inputs]
    quiet = np.asarray(fn(*inputs), np.float64)[0]
    shouted = np.asarray(fn(*loud), np.float64)[0]
    alone = np.asarray(fn(*(a[:1] for a in inputs)), np.float64)[0]
    return float(max(np.max(np.abs(shouted - quiet)), np.max(np.abs(alone - quiet))))


def rows_are_independent(fn, inputs, tolerance) -> tuple[bool, float]:
    """(independent within the tensor tolerance, the measured movement) for `row_dependence`."""
    moved = row_dependence(fn, inputs)
    ref = float(np.max(np.abs(np.asarray(fn(*(np.asarray(a)[:1] for a in inputs)), np.float64))))
    return bool(moved <= tolerance.atol + tolerance.rtol * ref), moved
