"""Noise-robust calibration: interleaved passes with real timing, outlier passes measured again, the per-call
overhead and per-node cost identified together, the wall-clock guard, and no unphysical profile written."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pytest

from slimformer.errors import ConfigError
from slimformer.export.kernels import KernelChoice
from slimformer.hardware_profiles import microbench as mb
from slimformer.hardware_profiles.calibrate import CalibrationGrid, calibrate
from slimformer.hardware_profiles.profile import save_profile
from slimformer.hardware_profiles.sampling import (
    OVERHEAD_COPIES,
    Bench,
    RepeatPolicy,
    SamplingReport,
    _Chunk,
    _remeasure_passes,
    measure,
)

TINY = CalibrationGrid(
    m_values=(1, 4), dims=(16, 32), linear=(KernelChoice("matmul", 32),), embedding=(KernelChoice("gather", 32),),
    heads=(1,), seqs=(8,), head_dims=(8,), elem_rows=(1, 4), elem_widths=(16,), references=(), seconds=10.0)


def _linear_bench(m_values: tuple[int, ...], k: int = 32, n: int = 32) -> Bench:
    choice = KernelChoice("matmul", 32)
    est = {("linear", 0, m, k, n): 10.0 for m in m_values}

    def build() -> object:
        return mb.linear_graph(choice, 1, k, n, 4)[0]

    return Bench(f"matmul {k}x{n}", build, {key: partial(mb.linear_feed, key[2], k) for key in est}, est, 4)


@pytest.fixture(scope="module")
def tiny_profile():
    return calibrate(1, TINY, name="tiny", progress=False)


def test_one_session_serves_every_token_count() -> None:
    proto, _ = mb.linear_graph(KernelChoice("matmulnbits", 4, 16, 16), 1, 32, 16, copies=2)
    sess = mb.session(proto, 1)
    for m in (1, 7, 64):
        outs = sess.run(None, mb.linear_feed(m, 32))
        assert len(outs) == 2 and outs[0].shape == (1, m, 16)
    proto, _ = mb.attention_graph(2, 8, 4, copies=1)
    sess = mb.session(proto, 1)
    assert sess.run(None, mb.attention_feed(2, 12, 4))[0].shape == (1, 12, 8)


def test_measure_gives_every_cell_a_median_and_fits_the_overheads_together() -> None:
    benches = [_linear_bench((1, 8)), _linear_bench((1, 8), 64, 16)]
    policy = RepeatPolicy(min_passes=3, max_passes=4, pass_s=0.002)
    cells, over, rep = measure(benches, 1, policy, time.perf_counter() + 30)
    assert set(cells) == {key for b in benches for key in b.feeds} and rep.cells == 4
    assert all(len(c.passes) >= 2 and c.run_us > 0 and c.copies == 4 for c in cells.values())
    # run = call + copies x node: both identified from the same graphs, both physical
    assert over.chunks == 1 and 0.05 <= over.node_us < over.call_us
    assert all(c.run_us > over.call_us for c in cells.values())  # a cell is never below the bare call
    assert all(c.call_us > 0 and c.kernel_us == (c.run_us - c.call_us) / 4 for c in cells.values())


def test_an_outlier_pass_is_measured_again() -> None:
    sessions = []
    for c in OVERHEAD_COPIES:
        proto, feed = mb.tiny_graph(c)
        sessions.append((mb.session(proto, 1), feed, f"x{c}"))
    ch = _Chunk(sessions, time.thread_time)
    ch.runs = [30] * len(sessions)
    cells = list(range(len(sessions)))
    for p in range(3):
        ch.one_pass(cells, p)
    for i in cells:  # a burst of other load during pass 1: every cell 3x slower
        ch.vals[i][1] *= 3.0
    burst = [v[1] for v in ch.vals]
    rep = SamplingReport()
    _remeasure_passes(ch, cells, RepeatPolicy(pass_tol=0.5), rep, lambda: True)
    assert rep.remeasured_passes >= 1 and all(r >= 1 for r in ch.remeasured)
    assert all(v[1] != b for v, b in zip(ch.vals, burst, strict=True))  # pass 1 was timed again


def test_the_deadline_guard_keeps_a_late_run_to_its_floor() -> None:
    policy = RepeatPolicy(min_passes=2, max_passes=6, min_runs=2, target_rel_se=0.0)
    cells, _, rep = measure([_linear_bench((1, 4))], 1, policy, deadline=time.perf_counter() - 1)
    assert rep.behind_chunks == 1 and rep.extra_passes == 0
    assert all(c.runs == policy.min_runs and len(c.passes) <= 2 for c in cells.values())
    cells, _, rep = measure([_linear_bench((1, 4))], 1, policy, deadline=time.perf_counter() + 30)
    assert rep.extra_passes >= 1  # target 0: with time left the noise asks for more passes, up to max_passes
    assert all(len(c.passes) <= policy.max_passes for c in cells.values())


def test_an_unphysical_profile_cannot_be_written(tiny_profile, tmp_path: Path) -> None:
    assert tiny_profile.physical_problems() == []
    out = tmp_path / "p.yaml"
    save_profile(tiny_profile, out)
    assert out.is_file()
    lm = tiny_profile.latency_model
    cases = {
        "per_op_overhead_us": tiny_profile.model_copy(update={"per_op_overhead_us": 0.001}),
        "peak_gflops_fp32": tiny_profile.model_copy(update={"peak_gflops_fp32": 5000.0}),
        "mem_bandwidth_gbs": tiny_profile.model_copy(update={"mem_bandwidth_gbs": 4600.0}),
        r"latency_model\.call_overhead_us": tiny_profile.model_copy(
            update={"latency_model": lm.model_copy(update={"call_overhead_us": 0.0})}),
    }
    tab = lm.linear["matmul"]
    shrunk = [[[t * (0.5 if i else 1.0) for t in row] for row in grid] for i, grid in enumerate(tab.times)]
    cases[r"linear\[matmul\]\.times is not non-decreasing"] = tiny_profile.model_copy(update={
        "latency_model": lm.model_copy(update={"linear": {**lm.linear, "matmul": tab.model_copy(
            update={"times": shrunk})}})})
    fast = [[[1e-4 for _ in row] for row in grid] for grid in tab.times]
    cases[r"linear\[matmul\]\.times has a time of 0\.0001"] = tiny_profile.model_copy(update={
        "latency_model": lm.model_copy(update={"linear": {**lm.linear, "matmul": tab.model_copy(
            update={"times": fast})}})})
    for field, bad in cases.items():
        dest = tmp_path / "bad.yaml"
        with pytest.raises(ConfigError, match=f"unphysical hardware profile tiny: .*{field}"):
            save_profile(bad, dest)
        assert not dest.exists()


def test_every_shipped_profile_is_physical() -> None:
    from slimformer.hardware_profiles import list_profiles, load_profile

    for name in list_profiles():
        assert load_profile(name).physical_problems() == [], name
