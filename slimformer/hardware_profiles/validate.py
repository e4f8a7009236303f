"""`slimformer profile validate`: the calibrated model against measured latencies of held-out plans.

Random plans (mixtures of fp32/fp16/int8/int4 with group sizes, low rank, pruned heads and FFN
neurons, unstructured sparsity, cross-layer sharing) that no calibration step saw, plus the uniform
baselines (flagged: calibration fits its residual on some of them, so headline metrics use the random
plans only). Every plan is exported (`export_onnx`) and all are timed round-robin with the bench protocol
in two passes; the noise floor is the median relative difference between the two passes' medians of the
same model. Reported side by side for the calibrated model and the FLOPs proxy (flops x the single
constant that best fits these measurements): MAPE, share within ±5% / ±10%, p95 error, Kendall tau; and
the uncalibrated roofline estimate's MAPE and tau (from the same profile's rate numbers, unscaled).
"""

from __future__ import annotations

import datetime as _dt
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from slimformer.compression.plan import (
    INT8_KERNEL_BITS,
    CompressionPlan,
    LayerSpec,
    SharingSpec,
    UnitSpec,
    sharing_pattern,
)
from slimformer.hardware_profiles.model_timing import (
    WARM_REPEAT,
    export_plans,
    input_feed,
    time_round_robin,
    warm_repeat,
)
from slimformer.hardware_profiles.predict import predict_canonical, require_model
from slimformer.hardware_profiles.profile import HardwareProfile, ValidationResult
from slimformer.hardware_profiles.roofline import estimate_latency
from slimformer.models.base import ModelAdapter

BASELINES = ("fp32", "int8", "int4-g32", "int4-g128")
FITTED = ("fp32", "int8", "int4-g32")  # calibration's residual is fitted on these (for its reference models)


@dataclass(frozen=True)
class PlanRow:
    name: str
    held_out: bool
    measured_ms: float
    repeat_ms: float
    predicted_ms: float
    estimate_ms: float
    flops: float
    roofline_ms: float
    description: str


def baseline_plans(adapter: ModelAdapter) -> dict[str, CompressionPlan]:
    """Uniform fp32, int8 (per row), int4 g32 and int4 g128 over every unit."""
    u = [x.name for x in adapter.units]
    return {"fp32": CompressionPlan(),
            "int8": CompressionPlan(units={n: UnitSpec(bits=8) for n in u}),
            "int4-g32": CompressionPlan(units={n: UnitSpec(bits=4, group_size=32) for n in u}),
            "int4-g128": CompressionPlan(units={n: UnitSpec(bits=4, group_size=128) for n in u})}


KERNEL_SEED = 7_919  # offset of the compute-kernel draws' own generator from the plans' seed
KERNEL_TAG = "int8 kernel"  # in a plan's description when its units' compute kernels were drawn


def random_plan(adapter: ModelAdapter, rng: random.Random,
                kernel_rng: random.Random | None = None) -> tuple[CompressionPlan, str]:
    """One random mixed plan and a short description of what it mixes. With `kernel_rng`, a random share of the
    units that can run the int8 compute kernel (8/4-bit, full rank, dense, not an embedding) run it: drawn from
    their own generator, so every other choice is the plan `rng` alone gives (stored measurements of plans
    drawn before the kernel axis existed are re-made with kernel_rng None)."""
    thrift = rng.random()  # how aggressive this plan is overall
    units: dict[str, UnitSpec] = {}
    for u in adapter.units:
        bits = rng.choices((32, 16, 8, 4), weights=(1.5 - thrift, 0.3, 1.0, 0.5 + thrift))[0]
        group = rng.choice((None, 32, 64, 128)) if bits in (8, 4) else None
        rank = None
        if u.role != "embedding" and rng.random() < 0.35 * thrift + 0.05:
            rank = max(8, int(min(u.shape) * rng.choice((0.75, 0.5, 0.25, 0.125))))
        sparsity = rng.choice((0.3, 0.5)) if rng.random() < 0.1 else 0.0
        units[u.name] = UnitSpec(rank=rank, sparsity=sparsity, bits=bits, group_size=group)
    int8 = 0
    if kernel_rng is not None:
        share = kernel_rng.choice((0.0, 0.5, 1.0, kernel_rng.random()))
        roles = {u.name: u.role for u in adapter.units}
        for name, spec in units.items():
            fits = spec.bits in INT8_KERNEL_BITS and spec.rank is None and not spec.sparsity
            if kernel_rng.random() < share and fits and roles[name] != "embedding":
                units[name] = replace(spec, kernel="int8")
                int8 += 1
    layers: dict[int, LayerSpec] = {}
    for info in adapter.layers:
        heads = rng.randint(1, info.num_heads) if rng.random() < 0.4 * thrift + 0.1 else None
        frac = rng.choice((0.25, 0.375, 0.5, 0.625, 0.75, 0.875))  # the fractions a search space offers
        neurons = round(info.intermediate * frac) if rng.random() < 0.4 * thrift + 0.1 else None
        if heads or neurons:
            layers[info.index] = LayerSpec(heads_kept=heads, neurons_kept=neurons)
    sharing = SharingSpec()
    if rng.random() < 0.2 and len(adapter.layers) >= 2:
        sharing = sharing_pattern("pairs", len(adapter.layers), rng.choice(("attention", "ffn", "block")))
    bits = sorted({s.bits for s in units.values()})
    desc = (f"bits {bits}, {sum(s.rank is not None for s in units.values())} low-rank, "
            f"{len(layers)} pruned layers, {sum(s.sparsity > 0 for s in units.values())} sparse"
            + (f", sharing {sharing.scope}" if sharing.groups else "")
            + (f", {int8} {KERNEL_TAG}" if kernel_rng is not None else ""))
    return CompressionPlan(units=units, layers=layers, sharing=sharing), desc


MIN_PASS_S = 20.0  # each timing pass lasts at least this long (more rounds for fast models)
MAX_ROUNDS = 400


def pass_rounds(runs: int, round_ms: float, min_pass_s: float = MIN_PASS_S, repeat: int = WARM_REPEAT) -> int:
    """Rounds per timing pass: `runs`, or more so that a pass lasts `min_pass_s` (a round runs every model
    `repeat` times; `round_ms` is one run of each). On this shared VM 25 rounds of the 0.35 ms ViT models
    (2 s a pass) left the two passes 4-7% apart when other tenants were busy; 200 rounds: 0.4%."""
    need = int(np.ceil(min_pass_s * 1e3 / max(repeat * round_ms, 1e-6)))
    return max(runs, min(MAX_ROUNDS, need))


def validation_plans(adapter: ModelAdapter, configs: int, seed: int = 0, kernels: bool = True
                     ) -> tuple[dict[str, CompressionPlan], dict[str, str]]:
    """The uniform baselines and `configs` random held-out plans (plan000...) drawn from `seed`, with a short
    description of each: the same plans for the same arguments (benchmarks re-score them with other profiles).
    `kernels`: draw compute kernels too (int8 or exact per unit); False re-makes the plans measured before."""
    rng = random.Random(seed)
    krng = random.Random(seed + KERNEL_SEED) if kernels else None
    plans = dict(baseline_plans(adapter))
    desc = {n: "uniform baseline" for n in plans}
    for i in range(configs):
        plans[f"plan{i:03d}"], desc[f"plan{i:03d}"] = random_plan(adapter, rng, krng)
    return plans, desc


def drew_kernels(descriptions: list[str]) -> bool:
    """Whether stored plan descriptions come from plans drawn with compute kernels (validation_plans(kernels=))."""
    return any(KERNEL_TAG in d for d in descriptions)


def results_stem(profile_name: str, model: str) -> str:
    """File stem of a validation's results JSON (benchmarks/results/<stem>.json)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"profile-validate-{profile_name}-{model}")


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def metrics(measured: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAPE, share within 5% / 10%, p95 absolute relative error, Kendall tau (errors as fractions)."""
    err = np.abs(predicted - measured) / measured
    return {"mape": float(err.mean()), "within_5": float((err <= 0.05).mean()),
            "within_10": float((err <= 0.10).mean()), "p95_error": float(np.percentile(err, 95)),
            "kendall_tau": kendall_tau(measured, predicted)}


def validate(profile: HardwareProfile, adapter: ModelAdapter, configs: int, batch: int, seq: int, threads: int,
             work_dir: Path, seed: int = 0, runs: int = 15, log=print,  # noqa: ANN001
             min_pass_s: float = MIN_PASS_S) -> tuple[ValidationResult, list[PlanRow]]:
    """Export, measure and predict `configs` random plans plus the baselines; the result and every row."""
    from slimformer.compression.plan_semantics import canonical_plan

    require_model(profile)
    plans, desc = validation_plans(adapter, configs, seed)
    canonical = {name: canonical_plan(adapter, plan) for name, plan in plans.items()}  # once per plan
    load0 = [round(x, 2) for x in os.getloadavg()]
    paths = export_plans(adapter, plans, work_dir, log=log)
    feed = input_feed(adapter, batch, seq)
    preds = {name: predict_canonical(adapter, plan, batch, seq, profile) for name, plan in canonical.items()}
    round_ms = sum(p.ms for p in preds.values())
    rep = warm_repeat(round_ms / max(len(preds), 1))
    runs = pass_rounds(runs, round_ms, min_pass_s, rep)
    log(f"timing {len(paths)} models round-robin, 2 passes x {runs} runs, {rep} runs per turn")
    first = time_round_robin(paths, feed, threads, runs, repeat=rep)
    second = time_round_robin(paths, feed, threads, runs, repeat=rep)
    rows = []
    for name, plan in canonical.items():
        p = preds[name]
        m1, m2 = float(np.median(first[name])), float(np.median(second[name]))
        est = estimate_latency(adapter.units, adapter.layers, plan, profile, batch, seq).ms
        rows.append(PlanRow(name, name.startswith("plan"), (m1 + m2) / 2, m2, p.ms, est, p.flops, p.roofline_ms,
                            desc[name]))
    held = [r for r in rows if r.held_out] or rows
    meas = np.array([r.measured_ms for r in held])
    pred = np.array([r.predicted_ms for r in held])
    flops = np.array([r.flops for r in held])
    kappa = float(np.median(meas / flops))  # the FLOPs proxy's one constant, fitted on these measurements
    ours, proxy = metrics(meas, pred), metrics(meas, flops * kappa)
    rough = metrics(meas, np.array([r.estimate_ms for r in held]))
    noise = float(np.median([abs(float(np.median(first[r.name])) - float(np.median(second[r.name]))) / r.measured_ms
                             for r in rows]))
    result = ValidationResult(
        model=adapter.model_id, batch=batch, seq=seq, configs=len(held), noise_floor=round(noise, 4),
        **{k: round(v, 4) for k, v in ours.items()},
        flops_mape=round(proxy["mape"], 4), flops_within_10=round(proxy["within_10"], 4),
        flops_kendall_tau=round(proxy["kendall_tau"], 4),
        estimate_mape=round(rough["mape"], 4), estimate_kendall_tau=round(rough["kendall_tau"], 4),
        roofline_fraction_median=round(float(np.median([r.roofline_ms / r.measured_ms for r in rows])), 4),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        loadavg=load0 + [round(x, 2) for x in os.getloadavg()], fingerprint=profile.fingerprint)
    return result, rows


def with_result(profile: HardwareProfile, result: ValidationResult) -> HardwareProfile:
    """The profile with `result` replacing any earlier result for the same model, batch and seq."""
    keep = [v for v in profile.validation if (v.model, v.batch, v.seq) != (result.model, result.batch, result.seq)]
    return profile.model_copy(update={"validation": [*keep, result]})


def rows_json(result: ValidationResult, rows: list[PlanRow], threads: int) -> dict:
    """The results file: summary, the FLOPs proxy side by side, and every plan's numbers."""
    from slimformer.export.bench import cpu_model

    return {"summary": result.model_dump(mode="json"), "threads": threads, "cpu": cpu_model(),
            "clock": "thread_cpu" if threads == 1 else "wall", "rows": [asdict(r) for r in rows]}
