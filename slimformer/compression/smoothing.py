"""Per-unit SmoothQuant for units that compute with the int8 kernel (`UnitSpec.smooth`, issue 13).

The int8 kernel quantises activations per tensor, so one outlier input feature costs every other feature its
resolution. SmoothQuant moves that range into the weight: y = (x / s) (W * s)^T, with
s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) (`ops.smoothing_factors`, the rule `--kernels fast` uses at export).
Here the factors are computed when the plan is applied, like GPTQ's data-aware step: max |x| per input feature
of the reference model's calibration activations (`calibration.collect_input_abs_max`, real tokens only), the
columns a structured pruning kept, and the effective (stored) weight. They live on the module (`SlimLinear.smooth`),
are packed with it, used by torch's int8 simulation and written by the exporter as they are, so torch and ONNX
compute the same thing. Rules:
- units reading one input (query/key/value of a layer) with the same alpha share one set of factors (SmoothQuant's
  shared-input rule: max |W| over all their rows), so the exporter divides the input once and still fuses them;
- a low-rank unit smooths its first factor (`down`, which reads the unit's input); `up` reads an intermediate the
  calibration pass does not see: it gets unit factors (ones), so it is a smoothed matrix like the others;
- a module shared by several layers takes the largest |x| over the inputs of all its uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimformer.compression import ops
from slimformer.compression.modules import LowRankLinear, SlimLinear
from slimformer.compression.plan import CompressionPlan
from slimformer.errors import PlanError
from slimformer.models.base import ModelAdapter


def smoothed_units(plan: CompressionPlan) -> list[str]:
    """The linear units whose spec asks for SmoothQuant (they need `collect_input_abs_max` statistics)."""
    return [n for n, s in plan.units.items() if s.smooth is not None]


def _reader(mod: nn.Module) -> SlimLinear | None:
    """The SlimLinear that reads the unit's input: the unit itself or its low-rank `down` factor."""
    if isinstance(mod, LowRankLinear):
        return mod.down
    return mod if isinstance(mod, SlimLinear) else None


def smooth_units(model: nn.Module, adapter: ModelAdapter, plan: CompressionPlan, act_max: dict[str, Tensor] | None,
                 in_index: dict[str, Tensor], rtn_fallback: bool = False) -> None:
    """Set `smooth` on the input-reading SlimLinear of every smoothed unit of the compressed `model` (after every
    unit is compressed: shared factors need all of q/k/v). Without statistics for a unit: PlanError, unless
    `rtn_fallback` (values about to be overwritten by a saved model's), which sets placeholder ones (the same
    graph: a timing export smooths with them)."""
    names = smoothed_units(plan)
    if not names:
        return
    # kept input columns by module: a layer sharing a pruned module reads the representative's kept columns
    kept = {id(_reader(model.get_submodule(n))): idx for n, idx in in_index.items()}
    readers: dict[int, SlimLinear] = {}
    alpha: dict[int, float] = {}
    stats: dict[int, Tensor] = {}
    for name in names:
        mod = model.get_submodule(name)
        r = _reader(mod)
        if r is None or r.kernel != "int8":  # pragma: no cover - the plan checks kernel int8 on linear units
            raise PlanError(f"{name}: smooth applies to linear units computing with kernel int8")
        if isinstance(mod, LowRankLinear):  # no statistics for its intermediate: unit factors
            mod.up.smooth = torch.ones(mod.up.in_features, device=mod.up.weight.device)
        x = None if act_max is None else act_max.get(name)
        if x is None:
            if not rtn_fallback:
                raise PlanError(f"{name}: smooth (SmoothQuant) needs calibration data (input max |x|); pass "
                                "calibration batches or drop smooth")
            r.smooth = torch.ones(r.in_features, device=r.weight.device)
            continue
        if x.numel() != r.in_features and id(r) in kept:  # heads / neurons pruned: the columns kept
            x = x[kept[id(r)].to(x.device)]
        x = x.detach().to(torch.float32).cpu()
        if x.shape != (r.in_features,):
            raise PlanError(f"{name}: input statistics have {x.numel()} features, the unit reads {r.in_features}")
        key = id(r)
        readers[key], alpha[key] = r, float(plan.unit(name).smooth)  # type: ignore[arg-type]
        stats[key] = torch.maximum(stats[key], x) if key in stats else x
    groups: list[list[int]] = []
    grouped: set[int] = set()
    for info in adapter.layers:  # units reading one input (q/k/v): one set of factors per alpha
        ids = [i for i in (id(_reader(model.get_submodule(n))) for n in info.qkv_units) if i in readers]
        for strength in sorted({alpha[i] for i in ids}):
            members = list(dict.fromkeys(i for i in ids if alpha[i] == strength and i not in grouped))
            if members:
                groups.append(members)
                grouped.update(members)
    groups += [[i] for i in readers if i not in grouped]
    for members in groups:
        w = torch.cat([readers[i].weight.detach().to(torch.float32).cpu() for i in members])
        x_max = stats[members[0]]
        for i in members[1:]:
            x_max = torch.maximum(x_max, stats[i])
        s = ops.smoothing_factors(x_max, w, alpha[members[0]])
        for i in members:
            readers[i].smooth = s.clone().to(readers[i].weight.device)
