import time

from onnxpipe.core.timing import summarize, time_interleaved


def test_summarize_percentiles_ordered_and_throughput():
    lat = summarize([1.0] * 90 + [2.0] * 9 + [10.0], batch=8)
    assert lat.p50 == 1.0 and lat.p50 <= lat.p90 <= lat.p99 <= 10.0
    assert abs(lat.throughput - 8000.0) < 1e-6


def test_interleaved_timing_orders_a_slow_and_a_fast_call():
    res = time_interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.002)}, batch=1, warmup=1, runs=10)
    assert res["slow"].runs == 10 and res["fast"].runs == 10
    assert res["slow"].p50 >= 2.0 > res["fast"].p50
