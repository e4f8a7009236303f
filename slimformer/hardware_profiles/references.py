"""The reference models calibration fits the whole-graph residual on (and validation measures): which
models, at which (batch, seq) shapes, with which fixed plans. Shared by calibrate.py, residual_fit.py,
validate.py and the `slimformer calibrate` / `profile validate` commands."""

from __future__ import annotations

from slimformer.compression.plan import CompressionPlan, LayerSpec, UnitSpec
from slimformer.models.base import ModelAdapter

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
VIT_FMNIST = "vit-fmnist"  # the Fashion-MNIST ViT geometry (random weights: latency does not depend on them)


def reference_adapter(name: str) -> ModelAdapter:
    """A reference model by name: `vit-fmnist` is the Fashion-MNIST ViT geometry with random weights."""
    if name == VIT_FMNIST:
        from slimformer.models.vit import ARCHITECTURE, MODEL_ARGS, create_vit

        return create_vit(ARCHITECTURE, dict(MODEL_ARGS), model_id=VIT_FMNIST)
    from slimformer.models import load

    return load(name)


def reference_plans(adapter: ModelAdapter) -> dict[str, CompressionPlan]:
    """The uniform plans, one pruned plan and two low-rank plans the residual is fitted on (low rank: every
    linear at a quarter of its smaller side in fp32, and at an eighth in int4 g32; embeddings stay dense)."""
    u = [x.name for x in adapter.units]
    pruned = {i.index: LayerSpec(heads_kept=max(1, i.num_heads // 2), neurons_kept=max(1, i.intermediate // 2))
              for i in adapter.layers}
    lin = [x for x in adapter.units if x.role != "embedding"]
    return {"fp32": CompressionPlan(),
            "int8": CompressionPlan(units={n: UnitSpec(bits=8) for n in u}),
            "int8-g32": CompressionPlan(units={n: UnitSpec(bits=8, group_size=32) for n in u}),
            "int4-g32": CompressionPlan(units={n: UnitSpec(bits=4, group_size=32) for n in u}),
            "pruned-half": CompressionPlan(layers=pruned),
            "lowrank-quarter": CompressionPlan(units={x.name: UnitSpec(rank=max(8, min(x.shape) // 4)) for x in lin}),
            "lowrank-eighth-int4": CompressionPlan(units={x.name: UnitSpec(rank=max(8, min(x.shape) // 8), bits=4,
                                                                          group_size=32) for x in lin})}
