"""Calibrated latency model: what onnxruntime executes for a plan, priced per kernel class from a profile.

`predict(adapter, plan, batch, seq, profile)` walks the forward pass's ops (the same enumeration as the
roofline estimate, `roofline.forward_ops`), asks the exporter's own rule
(`export.kernels.choose_linear_kernel` / `choose_embedding_kernel`) which kernel each unit lowers to,
and prices it with the profile's fitted model:

* linear kernels: a table per kernel class (`matmul`, `dequant_gemm:8:row`, `matmulnbits:4:32`, ...),
  piecewise in M = batch x seq tokens, each piece t = c0 + c1*K*N + c2*K + c3*N (non-negative
  coefficients, so more K or N never predicts faster); between grid points linear in M, monotone.
  fp16 linears are fp32 MatMuls after ORT folds their Cast at load. Low rank is two linears; pruning
  shrinks K/N; unstructured sparsity and 2:4 change nothing (ORT's CPU kernels are dense). A unit whose
  kernel is "int8" runs DynamicQuantizeMatMul, one class (`dynamic_int8`) whatever its stored bits and
  group (the session holds int8 weights with one scale per row); a profile without that table cannot price
  it and says to re-calibrate (no silent fallback to another kernel's times). A layer's q/k/v on it run as
  one kernel in the export, so they are priced as one linear of their summed width.
* embeddings: per table kernel, c0 + c1 * rows gathered * width.
* attention core per block from its fit in (batch*heads, seq, head_dim): the exported
  com.microsoft.MultiHeadAttention (`attention_mha`), or in profiles calibrated before it the decomposed core
  (split heads, QK^T, mask, Softmax, NaN guard, PV, merge; `attention_fit`); residual add + LayerNorm
  (fused SkipLayerNormalization), GELU, adds by elements.
* whole-graph residual per model family (glue reshapes, per-node dispatch, cache effects), fitted on
  full reference models at calibration: ms = scale * kernel_ms + layers * (per_layer_ms + M * ...); at a
  (batch, seq) the calibration timed whole models at, the shape-local residual fitted there instead
  (shape_residual.py: per-group scales + constant + per kept head, few-shot on sampled plans).

It also returns the FLOPs proxy (flops x one fitted constant) and the roofline bound (sum over ops of
max(flops / peak of the op's kernel class, bytes / bandwidth): no real run can beat it).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from functools import lru_cache

from slimformer.compression.plan import CompressionPlan
from slimformer.errors import ConfigError
from slimformer.export.kernels import KernelChoice, choose_embedding_kernel, choose_linear_kernel, unit_kernel_mode
from slimformer.hardware_profiles.profile import Fit, HardwareProfile, KernelTable, LatencyModel
from slimformer.hardware_profiles.residual import LOWRANK_PREFIX, apply_residual, glue_features
from slimformer.hardware_profiles.roofline import ForwardOp, forward_ops
from slimformer.hardware_profiles.shape_residual import apply_shape_residual, kept_heads, local_for
from slimformer.models.base import ModelAdapter

LABEL = "calibrated (onnxruntime kernel model)"


@dataclass(frozen=True)
class LatencyPrediction:
    """Predicted ms of one forward pass with an interval, plus the FLOPs and roofline references.

    breakdown: ms by kernel class before the whole-graph residual (their sum is `kernel_ms`).
    """

    ms: float
    low: float
    high: float
    flops: float
    roofline_ms: float
    flops_proxy_ms: float
    kernel_ms: float
    breakdown: dict[str, float] = field(default_factory=dict)
    label: str = LABEL


def kernel_class(choice: KernelChoice) -> str:
    """The profile key of a kernel: fp16 linears run as fp32 MatMuls (ORT folds the Cast at load)."""
    if choice.kind in ("matmul", "fp16_matmul"):
        return "matmul"
    if choice.kind == "dequant_gemm":
        return f"dequant_gemm:{choice.bits}:{'row' if choice.group is None else 'group'}"
    if choice.kind == "unpack_gemm":  # 3/2-bit codes unpacked to int8 at load, then int8 DequantizeLinear+Gemm
        return f"dequant_gemm:8:{'row' if choice.group is None else 'group'}"
    if choice.kind in ("gather", "fp16_gather", "gather_dequant"):
        return choice.kind if choice.kind != "gather_dequant" else f"gather_dequant:{choice.bits}"
    if choice.kind == "dynamic_int8":
        return "dynamic_int8"  # int8 resident and per-row scales whatever was stored: one table
    return f"{choice.kind}:{choice.bits}:{choice.block}"


@lru_cache(maxsize=4096)
def _linear_class(bits: int, group: int | None, k: int, n: int, kernel: str = "exact") -> str:
    return kernel_class(choose_linear_kernel(bits, group, k, n, mode=unit_kernel_mode(kernel)))


@lru_cache(maxsize=256)
def _embedding_class(bits: int, group: int | None, dim: int) -> str:
    return kernel_class(choose_embedding_kernel(bits, group, dim))


def _resolve(cls: str, available: dict[str, object], fallback: str) -> str:
    """`cls` if the profile has it, else the nearest calibrated class of the same kind and bits (closest
    block), else of the same kind, else `fallback` (the fp32 kernel); else a ConfigError."""
    if cls in available:
        return cls
    if cls == "dynamic_int8":  # another kernel's times would price int8 compute as something it is not
        raise ConfigError(f"the hardware profile has no calibration for kernel {cls!r} (units with kernel: int8); "
                          "re-calibrate with `slimformer calibrate` (it measures dynamic_int8) or use kernel exact")
    kind, _, rest = cls.partition(":")
    bits, _, block = rest.partition(":")
    same = [c for c in available if c.startswith(f"{kind}:{bits}:")]
    if same and block.isdigit():
        return min(same, key=lambda c: abs(int(c.rsplit(":", 1)[1]) - int(block))
                   if c.rsplit(":", 1)[1].isdigit() else 1 << 30)
    same = same or [c for c in available if c.split(":")[0] == kind]
    if same:
        return sorted(same)[0]
    if fallback in available:
        return fallback
    raise ConfigError(f"the hardware profile has no calibration for kernel {cls!r} (it has {sorted(available)}); "
                      "re-run `slimformer calibrate` with this kernel class")


def _fit_us(fit: Fit, x: tuple[float, ...]) -> float:
    return sum(c * v for c, v in zip(fit.coef, x, strict=False))


def _bracket(grid: list[int], v: int) -> tuple[int, float]:
    """Index i and weight w so that v ~ grid[i] * (1 - w) + grid[i + 1] * w, clamped to the grid."""
    if v <= grid[0]:
        return 0, 0.0
    if v >= grid[-1]:
        return len(grid) - 2, 1.0
    i = bisect_right(grid, v) - 1
    return i, (v - grid[i]) / (grid[i + 1] - grid[i])


def _grid_us(table: KernelTable, i: int, k: int, n: int) -> float:
    """Bilinear in (K, N) on the i-th M slice; outside the dims, the edge time scaled by the work ratio."""
    d = table.dims
    if len(d) < 2:
        return _fit_us(table.fits[i], (1.0, float(k * n), float(k), float(n)))
    kc, nc = min(max(k, d[0]), d[-1]), min(max(n, d[0]), d[-1])
    a, wa = _bracket(d, kc)
    b, wb = _bracket(d, nc)
    t = table.times[i]
    us = ((t[a][b] * (1 - wb) + t[a][b + 1] * wb) * (1 - wa) + (t[a + 1][b] * (1 - wb) + t[a + 1][b + 1] * wb) * wa)
    if kc != k or nc != n:
        us *= max(1.0, (k * n) / (kc * nc))
    return us


def table_us(table: KernelTable, m: int, k: int, n: int) -> float:
    """Time (µs) of one linear at (m, k, n): the M slices' grids, linear in M between grid points (never
    decreasing with M), extrapolated along the last segment beyond the grid."""
    ms = table.m_values
    if len(ms) == 1:
        return _grid_us(table, 0, k, n) * max(1.0, m / ms[0])
    i = min(max(bisect_right(ms, m) - 1, 0), len(ms) - 2)
    lo, hi = _grid_us(table, i, k, n), _grid_us(table, i + 1, k, n)
    hi = max(hi, lo)
    if m <= ms[0]:
        return lo
    return lo + (hi - lo) * (m - ms[i]) / (ms[i + 1] - ms[i])


def attention_features(batch_heads: int, seq: int, head_dim: int) -> tuple[float, ...]:
    """1, QK^T/PV multiply-adds, score elements (mask, softmax, NaN guard), q/k/v/context elements."""
    bh, s, d = float(batch_heads), float(seq), float(head_dim)
    return (1.0, bh * s * s * d, bh * s * s, bh * s * d)


def attention_fit(lm: LatencyModel) -> Fit | None:
    """The fit that prices one attention core: the exporter lowers SDPA attention to MultiHeadAttention
    (export/attention.py), so its own fit when the profile has one; a profile calibrated before it existed
    falls back to the decomposed core's fit (split heads, QK^T, mask, Softmax, NaN guard, PV, merge), which
    over-prices the fused node a little (MiniLM shapes, 1 thread, under load: fused <= decomposed) and whose
    whole-graph residual was fitted on decomposed exports; re-calibrate to price the fused graph exactly.
    Families whose attention calls no SDPA (MPNet: relative position bias) keep the decomposition in the export
    but are priced with the same fit (their family residual absorbs the difference)."""
    return lm.attention_mha if lm.attention_mha is not None else lm.attention


def _elementwise_class(name: str) -> str | None:
    if name.endswith("_residual"):
        return None  # fused with the following LayerNorm (SkipLayerNormalization)
    if name.endswith("layernorm"):
        return "layernorm"
    if name.endswith("gelu"):
        return "gelu"
    return "add"


def require_model(profile: HardwareProfile) -> LatencyModel:
    """The profile's calibrated latency model, or a one-line ConfigError saying how to get one."""
    if profile.latency_model is None or not profile.latency_model.linear:
        raise ConfigError(f"hardware profile {profile.name!r} has no calibrated latency model; make one with "
                          "`slimformer calibrate --runtime onnxruntime --out PROFILE.yaml` or use latency.source "
                          "estimate")
    return profile.latency_model


def require_linear_class(profile: HardwareProfile, cls: str) -> None:
    """A one-line ConfigError unless the profile can price linear kernel class `cls` (e.g. "dynamic_int8")."""
    lm = require_model(profile)
    if cls not in lm.linear:
        _resolve(cls, lm.linear, "matmul")


class _Compiled:
    """A profile's latency model in plain tuples, with memoised kernel times (shapes repeat across plans)."""

    def __init__(self, profile: HardwareProfile, lm: LatencyModel) -> None:
        self.lm = lm
        self.lin, self.emb, self.elw = lm.linear, lm.embedding, lm.elementwise
        self.peak = {c: v * 1e6 for c, v in profile.peak_gflops.items()}
        self.peak_fp32 = profile.peak_gflops_fp32 * 1e6  # flops per ms
        self.bw = profile.mem_bandwidth_gbs * 1e6  # bytes per ms
        self.classes: dict[tuple, str] = {}
        self.memo: dict[tuple, float] = {}

    def linear_us(self, bits: int, group: int | None, m: int, k: int, n: int, kernel: str = "exact"
                  ) -> tuple[str, float]:
        ckey = (bits, group, k, n, kernel)
        cls = self.classes.get(ckey)
        if cls is None:
            cls = _linear_class(bits, group, k, n, kernel)
            cls = cls if cls in self.lin else _resolve(cls, self.lin, "matmul")
            self.classes[ckey] = cls
        key = (cls, m, k, n)
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = table_us(self.lin[cls], m, k, n)
        return cls, hit

    def embedding_us(self, bits: int, group: int | None, m: int, n: int) -> tuple[str, float]:
        key = ("emb", bits, group, m, n)
        hit = self.memo.get(key)
        cls = self.classes.get(key[:3] + (n,))
        if cls is None:
            cls = _embedding_class(bits, group, n)
            cls = cls if cls in self.emb else _resolve(cls, self.emb, "gather")
            self.classes[key[:3] + (n,)] = cls
        if hit is None:
            hit = self.memo[key] = _fit_us(self.emb[cls], (1.0, float(m * n)))
        return cls, hit


_COMPILED: dict[int, tuple[LatencyModel, _Compiled]] = {}


def _compiled(profile: HardwareProfile, lm: LatencyModel) -> _Compiled:
    entry = _COMPILED.get(id(lm))
    if entry is None or entry[0] is not lm:
        if len(_COMPILED) > 16:
            _COMPILED.clear()
        entry = _COMPILED[id(lm)] = (lm, _Compiled(profile, lm))
    return entry[1]


def _fused_int8_projections(adapter: ModelAdapter, plan: CompressionPlan, ops: list[ForwardOp],
                            c: _Compiled) -> dict[str, int]:
    """Linear op name -> the output width it is priced at, for a layer's q/k/v that the exporter runs as one
    int8 GEMM (export/graph.py `fused_group`: >= 2 of them on `dynamic_int8`, not low rank, the layer's
    attention not shared): the first at the members' summed width, the others at 0 (they cost nothing more)."""
    shared = {i for g in plan.sharing.groups if len(g) > 1 and plan.sharing.scope in ("attention", "block")
              for i in g}
    lin = {op.name: op for op in ops if op.kind == "linear"}
    out: dict[str, int] = {}
    for layer in adapter.layers:
        if layer.index in shared:
            continue
        members = []
        for u in layer.qkv_units:
            op = lin.get(u)
            spec = op.spec if op is not None else None
            if op is None or spec is None or spec.rank is not None:
                continue
            cls, _ = c.linear_us(spec.bits, spec.group_size if spec.quantized else None, op.m, op.k, op.n,
                                 spec.kernel)
            if cls == "dynamic_int8":
                members.append(op)
        if len(members) >= 2:
            out[members[0].name] = sum(op.n for op in members)
            out.update({op.name: 0 for op in members[1:]})
    return out


def predict(adapter: ModelAdapter, plan: CompressionPlan, batch: int, seq: int,
            profile: HardwareProfile) -> LatencyPrediction:
    """Predicted onnxruntime latency (ms) of the plan-compressed model's exported graph on `profile`.

    The plan is priced as `apply_plan` builds it: a layer that shares its representative's modules runs
    the representative's specs, whatever its own entries say (canonical_plan)."""
    from slimformer.compression.plan_semantics import canonical_plan  # lazy: torch is not needed to load a profile

    return predict_canonical(adapter, canonical_plan(adapter, plan), batch, seq, profile)


def predict_canonical(adapter: ModelAdapter, plan: CompressionPlan, batch: int, seq: int,
                      profile: HardwareProfile) -> LatencyPrediction:
    """`predict` for a plan already in canonical form (`canonical_plan`): callers that canonicalise once
    per pricing path (evaluators/latency) skip the second pass."""
    lm = require_model(profile)
    c = _compiled(profile, lm)
    elw, bw, peak_fp32 = c.elw, c.bw, c.peak_fp32
    by: dict[str, float] = {}
    flops = roof = 0.0
    ops = list(forward_ops(adapter.units, adapter.layers, plan, batch, seq))
    fused = _fused_int8_projections(adapter, plan, ops, c)
    for op in ops:
        kind = op.kind
        flops += op.flops
        nbytes = op.weight_bytes + op.activation_bytes
        if kind == "linear":
            spec = op.spec
            assert spec is not None
            cls, us = c.linear_us(spec.bits, spec.group_size if spec.quantized else None, op.m, op.k,
                                  fused.get(op.name) or op.n, spec.kernel)
            us = 0.0 if fused.get(op.name) == 0 else us  # computed by its layer's fused q/k/v kernel
            roof += max(op.flops / c.peak.get(cls, peak_fp32), nbytes / bw)
            if spec.rank is not None:  # a low-rank factor: its own residual family (residual.LOWRANK)
                cls = LOWRANK_PREFIX + cls
        elif kind == "embedding":
            spec = op.spec
            assert spec is not None
            cls, us = c.embedding_us(spec.bits, spec.group_size if spec.quantized else None, op.m, op.n)
            roof += nbytes / bw
        elif kind == "attention":
            roof += max(op.flops / peak_fp32, nbytes / bw)
            core = attention_fit(lm)
            if not op.name.endswith("attn_scores") or core is None:
                continue
            cls, us = "attention", _fit_us(core, attention_features(op.m, op.k, op.n))
        else:
            roof += nbytes / bw
            ecls = _elementwise_class(op.name)
            if ecls is None or ecls not in elw:
                continue
            cls, us = ecls, _fit_us(elw[ecls], (1.0, float(op.m)))
        by[cls] = by.get(cls, 0.0) + us * 1e-3
    kernel_ms = sum(by.values())
    res = lm.residual.get(adapter.family) or (next(iter(lm.residual.values())) if lm.residual else None)
    local = local_for(lm.local_residual.get(adapter.family, ()), batch, seq)
    if local is not None:
        ms = apply_shape_residual(local, by, kept_heads(adapter, plan))
        rel = local.rmse_rel
    elif res is not None:
        ms = apply_residual(res, by, glue_features(adapter, plan, batch, seq))
        rel = res.rmse_rel
    else:
        ms, rel = kernel_ms + lm.call_overhead_us * 1e-3, 0.1
    noise = profile.noise.median_rel_iqr if profile.noise is not None else 0.05
    half = 2.0 * max((rel * rel + noise * noise) ** 0.5, 0.01)
    return LatencyPrediction(ms=ms, low=ms * (1 - half), high=ms * (1 + half), flops=flops, roofline_ms=roof,
                             flops_proxy_ms=flops * 1e-9 * lm.flops_ms_per_gflop, kernel_ms=kernel_ms, breakdown=by)
