"""Torch roofline rates: measure a (torch-runtime) hardware profile's GEMM rate, memory bandwidth and op overhead.

The three machine numbers the roofline estimate (roofline.py) prices with; not the onnxruntime kernel
micro-benchmarks of `slimformer calibrate` (microbench.py).

    python -m slimformer.hardware_profiles.torch_rates --threads 2 --out my-machine.yaml [--quick]

All three numbers are *best observed* (GEMM, bandwidth) or *median* (overhead) wall-clock rates at a
fixed thread count. They are inputs to a roofline estimate, not a latency guarantee. A full run takes
a few seconds and is capped well under 30 s; `quick` uses smaller problems and fewer repeats (< 5 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import torch

from slimformer.errors import SlimformerError
from slimformer.hardware_profiles.machine import cpu_info, default_name
from slimformer.hardware_profiles.profile import HardwareProfile, save_profile
from slimformer.threads import using_threads

# (M, K, N) of the fp32 GEMMs timed; the best rate over all shapes and repeats is the peak.
_GEMM_SHAPES_FULL = ((1024, 1024, 1024), (2048, 2048, 2048), (2048, 1024, 4096), (1024, 4096, 1024))
_GEMM_SHAPES_QUICK = ((1024, 1024, 1024), (512, 1024, 2048))


def _time_best(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    """Best wall time of `fn` over `repeats` runs after one warm-up; stops early once `budget_s` is spent."""
    fn()  # warm-up: page faults, kernel selection, thread pool start
    deadline = time.perf_counter() + budget_s
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return best


def measure_gemm_gflops(quick: bool = False) -> float:
    """Best fp32 torch.matmul rate (GFLOP/s, 2*M*K*N flops per GEMM) at the current torch thread count."""
    shapes = _GEMM_SHAPES_QUICK if quick else _GEMM_SHAPES_FULL
    repeats = 3 if quick else 10
    budget = (1.5 if quick else 14.0) / len(shapes)
    best = 0.0
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        if best and 2.0 * (2.0 * m * k * n / (best * 1e9)) > budget:
            continue  # a slow machine: warm-up plus one run of this shape would overrun the time cap
        a = torch.randn(m, k, generator=gen)
        b = torch.randn(k, n, generator=gen)
        c = torch.empty(m, n)
        t = _time_best(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), repeats, budget)
        best = max(best, 2.0 * m * k * n / t / 1e9)
    return best


def measure_bandwidth_gbs(quick: bool = False) -> float:
    """Best large-tensor streaming rate (GB/s, bytes read + bytes written) over copy_ and add."""
    mbytes = 64 if quick else 256
    n = mbytes * 1024 * 1024 // 4
    repeats = 3 if quick else 8
    budget = 1.0 if quick else 4.0
    src = torch.ones(n)
    dst = torch.empty(n)
    t_copy = _time_best(lambda: dst.copy_(src), repeats, budget)
    best = 2.0 * src.nbytes / t_copy / 1e9  # read src, write dst
    other = torch.full((n,), 2.0)
    t_add = _time_best(lambda: torch.add(src, other, out=dst), repeats, budget)
    best = max(best, 3.0 * src.nbytes / t_add / 1e9)  # read two, write one
    return best


def measure_op_overhead_us(quick: bool = False) -> float:
    """Median wall time (µs) of tiny ops (add, linear on a handful of elements): the per-op floor."""
    trials = 9 if quick else 31
    calls = 100 if quick else 300
    a = torch.ones(1, 8)
    b = torch.ones(1, 8)
    w = torch.ones(8, 8)
    samples: list[float] = []
    with torch.inference_mode():
        for op in (lambda: a + b, lambda: torch.nn.functional.linear(a, w)):
            for _ in range(calls):  # warm-up
                op()
            for _ in range(trials):
                t0 = time.perf_counter()
                for _ in range(calls):
                    op()
                samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def measure_profile(threads: int, quick: bool = False, name: str | None = None) -> HardwareProfile:
    """Measure this machine at `threads` torch threads (restored afterwards) and return its profile."""
    if threads < 1:
        raise SlimformerError(f"threads must be >= 1 (got {threads})")
    with using_threads(threads):
        gflops = measure_gemm_gflops(quick)
        bandwidth = measure_bandwidth_gbs(quick)
        overhead = measure_op_overhead_us(quick)
    cpu, isa = cpu_info()
    today = date.today()
    how = f"measure_profile(threads={threads}{', quick=True' if quick else ''})"
    return HardwareProfile(
        name=name or default_name(cpu, isa, threads),
        cpu=cpu,
        cores=os.cpu_count() or 1,
        threads=threads,
        isa_flags=isa,
        runtime="torch",
        runtime_version=torch.__version__,
        peak_gflops_fp32=round(gflops, 2),
        mem_bandwidth_gbs=round(bandwidth, 2),
        per_op_overhead_us=round(overhead, 3),
        created=today,
        notes=(
            f"Made by slimformer.hardware_profiles.torch_rates.{how} on this machine ({cpu}, "
            f"{os.cpu_count()} logical CPUs, torch {torch.__version__}) on {today.isoformat()}. "
            "Best-of-repeats fp32 GEMM and copy/add bandwidth, median tiny-op time; "
            "inputs to a roofline latency estimate, not measured model latencies."
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slimformer.hardware_profiles.torch_rates",
        description="Measure GEMM rate, memory bandwidth and op overhead; write a hardware profile YAML.",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads to measure at (default: %(default)s)")
    parser.add_argument("--out", required=True, help="path of the profile YAML to write")
    parser.add_argument("--quick", action="store_true", help="smaller problems, fewer repeats (< 5 s)")
    parser.add_argument("--name", default=None, help="profile name (default: derived from CPU, ISA, threads)")
    parser.add_argument("--notes", default=None, help="replace the generated notes")
    args = parser.parse_args(argv)
    try:
        profile = measure_profile(args.threads, quick=args.quick, name=args.name)
        if args.notes is not None:
            profile = profile.model_copy(update={"notes": args.notes})
        path = save_profile(profile, args.out)
    except (SlimformerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{profile.name}: {profile.peak_gflops_fp32:.1f} GFLOP/s fp32, {profile.mem_bandwidth_gbs:.1f} GB/s, "
        f"{profile.per_op_overhead_us:.2f} us/op at {profile.threads} thread(s) -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
