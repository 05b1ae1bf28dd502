"""Uncertainty of accuracy deltas: the exact McNemar test and the paired bootstrap interval against cases
worked out by hand, and their place beside every lossy verdict (information; the budget decides)."""
import math
import shutil

import numpy as np
import pytest

from onnxpipe.core.parity import Delta, bootstrap_interval, mcnemar_exact, paired_delta, task_parity
from onnxpipe.core.policy import NOT_DISTINGUISHABLE, POLICY, Uncertainty
from onnxpipe.runfolder import Run


@pytest.mark.parametrize("a_only, b_only, p", [
    (0, 0, 1.0),                                   # no discordant rows: nothing to test
    (1, 0, 1.0),                                   # 2 * 1/2
    (5, 0, 2 / 32),                                # 2 * (1/2)^5 = 0.0625
    (6, 0, 2 / 64),                                # 0.03125: the first all-one-way count below 0.05
    (10, 2, 2 * (1 + 12 + 66) / 4096),             # 2 * [C(12,0) + C(12,1) + C(12,2)] / 2^12 = 0.03857
    (2, 10, 2 * (1 + 12 + 66) / 4096),             # symmetric
    (3, 3, 1.0),                                   # 2 * P[X <= 3 | n=6] = 2 * 42/64 > 1 -> 1
    (7, 3, 2 * (1 + 10 + 45 + 120) / 1024),        # 0.34375
])
def test_mcnemar_exact_matches_hand_computed_p_values(a_only, b_only, p):
    assert mcnemar_exact(a_only, b_only) == pytest.approx(p, abs=1e-15)


def _binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest k with P[Binomial(n, p) <= k] >= q, summed by hand."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


def test_bootstrap_interval_of_hand_computed_cases():
    settings = dict(confidence=0.95, resamples=20_000, seed=0)
    # every row agrees: the delta is exactly 0 in every resample
    assert bootstrap_interval(0, 0, 100, **settings) == (0.0, 0.0)
    # a is right and b wrong on every row: 100 points in every resample
    assert bootstrap_interval(100, 0, 100, **settings) == (100.0, 100.0)
    # 10 of 100 rows favour a, none b: the resampled count is Binomial(100, 0.1), so the interval is that
    # binomial's 2.5% and 97.5% quantiles, in points (one row = 1 point here)
    lo, hi = bootstrap_interval(10, 0, 100, **settings)
    assert lo == pytest.approx(_binomial_quantile(100, 0.1, 0.025), abs=1.0)   # 4
    assert hi == pytest.approx(_binomial_quantile(100, 0.1, 0.975), abs=1.0)   # 16
    # 10 rows each way of 100: mean 0, variance n*(p+q) - n*(p-q)^2 = 20 rows^2 -> +/- 1.96 * sqrt(20) = 8.8 points
    lo, hi = bootstrap_interval(10, 10, 100, **settings)
    assert lo == pytest.approx(-1.96 * math.sqrt(20), abs=1.2) and hi == pytest.approx(1.96 * math.sqrt(20), abs=1.2)


def test_paired_delta_counts_rows_and_is_seeded():
    a = np.zeros(360, bool)
    b = np.zeros(360, bool)
    a[:10] = True          # rows only a gets right
    b[10:13] = True        # rows only b gets right
    a[100:300] = b[100:300] = True
    d = paired_delta(a, b)
    assert (d.a_only, d.b_only, d.rows) == (10, 3, 360)
    assert d.delta_pt == pytest.approx(100 * 7 / 360)
    assert d.p_value == pytest.approx(mcnemar_exact(10, 3))
    assert d.low_pt <= d.delta_pt <= d.high_pt
    assert paired_delta(a, b) == d                                        # seeded: the same rows, the same interval
    other = paired_delta(a, b, Uncertainty(seed=1))
    assert (other.a_only, other.delta_pt) == (d.a_only, d.delta_pt)
    assert Delta.from_json(d.to_json()) == d
    assert d.resamples == POLICY.uncertainty.resamples and d.confidence == 0.95


def test_distinguishable_needs_both_the_interval_and_mcnemar():
    n = 360
    same = paired_delta(np.ones(n, bool), np.ones(n, bool))
    assert not same.distinguishable and same.words().endswith(NOT_DISTINGUISHABLE)
    one = np.ones(n, bool)
    worse = one.copy()
    worse[:1] = False       # one image: 0.28 points, p = 1
    d1 = paired_delta(one, worse)
    assert d1.delta_pt == pytest.approx(100 / n) and d1.p_value == 1.0 and not d1.distinguishable
    worse[:30] = False      # 30 images one way: p = 2 / 2^30
    d30 = paired_delta(one, worse)
    assert d30.distinguishable and d30.low_pt > 0 and NOT_DISTINGUISHABLE not in d30.words()
    assert d30.p_value == pytest.approx(2 / 2 ** 30)


def test_task_parity_reports_the_drop_with_its_interval_beside_the_budget():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    ref = np.eye(10)[labels] * 5.0
    cand = ref.copy()
    cand[:2] = np.eye(10)[(labels[:2] + 1) % 10] * 5.0       # candidate wrong on 2 rows the reference gets right
    rep = task_parity("onnx", "int8", ref, cand, labels, max_accuracy_drop=1.0, min_agreement=0.9)
    assert rep.accuracy_drop == pytest.approx(1.0) and rep.passed           # the budget decides: 1.0 <= 1.0
    assert (rep.drop.a_only, rep.drop.b_only) == (2, 0) and rep.drop.p_value == pytest.approx(0.5)
    assert NOT_DISTINGUISHABLE in rep.summary() and NOT_DISTINGUISHABLE in rep.budget_line()
    entry = rep.to_json()
    assert entry["uncertainty"]["a_only"] == 2 and entry["uncertainty"]["distinguishable"] is False
    assert entry["uncertainty"]["ci_pt"][0] <= 0 <= entry["uncertainty"]["ci_pt"][1]
    cand[:40] = np.eye(10)[(labels[:40] + 1) % 10] * 5.0      # 20 points worse: over budget and distinguishable
    rep = task_parity("onnx", "int8", ref, cand, labels, max_accuracy_drop=1.0, min_agreement=0.9)
    assert not rep.passed and rep.drop.distinguishable and NOT_DISTINGUISHABLE not in rep.summary()


def test_verify_records_the_interval_and_the_report_says_not_distinguishable(copy_of):
    """An INT8 stand-in that equals its parent: a lossy verdict with a 0-point drop, shown as such."""
    from onnxpipe.core.data import reload_dataset
    from onnxpipe.stages.configs import VerifyConfig
    from onnxpipe.stages.report import write_report
    from onnxpipe.stages.verify import verify

    run = Run.open(copy_of("cnn"))
    shutil.copy(run.root / "model.onnx", run.root / "same.onnx")
    run.add_artifact("int8_dynamic", "same.onnx", stage="quantize", parent="onnx", lossy=True)
    verify(run, VerifyConfig(batches=(1,)), reload_dataset(run.dataset_info))
    entry = run.parity(reference="onnx", candidate="int8_dynamic")[0]
    u = entry["uncertainty"]
    assert entry["rule"] == "task" and u["delta_pt"] == 0.0 and u["ci_pt"] == [0.0, 0.0] and u["mcnemar_p"] == 1.0
    assert u["rows"] == len(reload_dataset(run.dataset_info).y_test)
    _, md = write_report(run)
    text = md.read_text()
    assert "drop: 95% CI, McNemar" in text and f"0.00 pt [95% CI 0.00, 0.00], McNemar p=1: {NOT_DISTINGUISHABLE}" in text
