"""Compression plans as plain value objects: what to do to each unit, layer and sharing group.

A plan holds no tensors and does no compute; it is what the search samples, what memory accounting
prices and what a recipe serialises. Identity values (full rank, no sparsity, 32 bits, all heads and
neurons, no sharing) are the defaults, so an empty plan leaves the model exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from slimformer.compression.embedding_tiers import TierSpec
from slimformer.errors import PlanError

SparsityPattern = Literal["unstructured", "2:4"]
QuantMethod = Literal["rtn", "gptq", "gptq-ao", "recon"]
QUANT_METHODS: tuple[str, ...] = ("rtn", "gptq", "gptq-ao", "recon")
DATA_METHODS: tuple[str, ...] = ("gptq", "gptq-ao", "recon")  # need calibration Hessians (linear units)
ComputeKernel = Literal["exact", "int8"]
COMPUTE_KERNELS = ("exact", "int8")
DEFAULT_SMOOTH = 0.65  # SmoothQuant alpha new searches give int8-kernel units (chosen on MiniLM's search split)
INT8_KERNEL_BITS = (8, 4)  # stored widths the int8 compute kernel runs (their codes requantise to int8 per row)
SharingScope = Literal["attention", "ffn", "block"]
StructureImportance = Literal["weight", "activation"]
VALID_BITS = (32, 16, 8, 4, 3, 2)
INT_BITS = (8, 4, 3, 2)  # integer codes + fp32 scales (= compression.ops.QUANT_BITS)
LINEAR_ONLY_BITS = (3, 2)  # widths the exporter runs exactly for linear units only (MatMulNBits 2-bit, unpacked 3-bit)


@dataclass(frozen=True)
class UnitSpec:
    """How one weight matrix is compressed.

    rank: keep this many singular values (None = full matrix, no factorisation).
    sparsity: share of weights zeroed by magnitude (unstructured) or 0.5 exactly for 2:4.
    bits: 32 (fp32), 16 (fp16), 8 or 4 (symmetric integer, weight-only), 3 or 2 (all 2^b levels with a signed
        scale per group; linear units only).
    group_size: quantisation group along the input dimension; None = one scale per output channel.
    method: rounding for integer bits: "rtn" (round to nearest, clipping search), "gptq" (error-compensating,
        needs calibration Hessians), "gptq-ao" (GPTQ in activation order with a per-unit damping search) or
        "recon" (gptq-ao codes, then every scale re-fitted by least squares on the unit's calibration outputs;
        compression/reconstruct.py). Storage and memory are the same for all.
    kernel: how the unit computes once deployed: "exact" (weight-only: the stored weight is dequantised and the
        matmul runs in fp32; bit-faithful) or "int8" (onnxruntime's int8 GEMM: the weight requantised to int8 per
        output row, the activations quantised to uint8 per tensor at run time; faster, not exact). "int8" is
        valid for 8- and 4-bit linear units only; storage and memory are the same for both.
    smooth: SmoothQuant migration strength alpha in [0, 1] of a `kernel: int8` unit, or None (unsmoothed: what
        plans and recipes without the field mean). Set, the unit's factors s = max|x|^alpha / max|W|^(1-alpha)
        per input feature (calibration activations) are computed when the plan is applied and stored (4 bytes per
        input feature); the int8 kernel quantises x / s and requantises W * s (compression/smoothing.py).
    tiers: embedding tables only: per-row precision tiers by token frequency (compression/embedding_tiers.py);
        the tiers set the precision, so bits stays 32 and rank/sparsity are not combined with them.
    """

    rank: int | None = None
    sparsity: float = 0.0
    pattern: SparsityPattern = "unstructured"
    bits: int = 32
    group_size: int | None = None
    method: QuantMethod = "rtn"
    kernel: ComputeKernel = "exact"
    tiers: TierSpec | None = None
    smooth: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise PlanError(f"rank must be >= 1 (got {self.rank}); use null for full rank")
        if not 0.0 <= self.sparsity < 1.0:
            raise PlanError(f"sparsity must be in [0, 1) (got {self.sparsity})")
        if self.pattern not in ("unstructured", "2:4"):
            raise PlanError(f"pattern must be 'unstructured' or '2:4' (got {self.pattern!r})")
        if self.pattern == "2:4" and self.sparsity not in (0.0, 0.5):
            raise PlanError(f"pattern '2:4' means sparsity 0.5 (got {self.sparsity}); set sparsity: 0.5")
        if self.bits not in VALID_BITS:
            raise PlanError(f"bits must be one of {VALID_BITS} (got {self.bits})")
        if self.method not in QUANT_METHODS:
            raise PlanError(f"method must be one of {', '.join(QUANT_METHODS)} (got {self.method!r})")
        if self.kernel not in COMPUTE_KERNELS:
            raise PlanError(f"kernel must be 'exact' or 'int8' (got {self.kernel!r})")
        if self.kernel == "int8" and self.bits not in INT8_KERNEL_BITS:
            raise PlanError(f"kernel 'int8' runs 8- or 4-bit weights (got bits {self.bits}); use kernel exact "
                            "or bits 8/4")
        if self.smooth is not None:
            if not 0.0 <= self.smooth <= 1.0:  # NaN fails this too
                raise PlanError(f"smooth (SmoothQuant alpha) must be in [0, 1] or null (got {self.smooth})")
            if self.kernel != "int8":
                raise PlanError(f"smooth (SmoothQuant alpha) applies to kernel int8 units only (got smooth "
                                f"{self.smooth} with kernel {self.kernel}); drop smooth or set kernel int8")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise PlanError(f"group_size must be an even number >= 2 or null (got {self.group_size})")
        if self.tiers is not None and (self.bits != 32 or self.rank is not None or self.sparsity):
            raise PlanError("embedding tiers set the table's precision: leave bits 32, rank null and sparsity 0 "
                            "on a tiered unit")

    @property
    def is_identity(self) -> bool:
        return self.rank is None and self.sparsity == 0.0 and self.bits == 32 and self.tiers is None

    @property
    def quantized(self) -> bool:
        return self.bits in INT_BITS

    @property
    def needs_hessian(self) -> bool:
        """Integer bits rounded by a data-aware method (its linear units need calibration Hessians)."""
        return self.quantized and self.method in DATA_METHODS


@dataclass(frozen=True)
class LayerSpec:
    """Structured pruning of one Transformer block: heads and FFN neurons kept (None = all)."""

    heads_kept: int | None = None
    neurons_kept: int | None = None

    def __post_init__(self) -> None:
        for name in ("heads_kept", "neurons_kept"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise PlanError(f"{name} must be >= 1 (got {v}); use null to keep all")


@dataclass(frozen=True)
class StructureSpec:
    """How heads/neurons are chosen and what is done to the projection that reads them (plan-wide).

    importance: "weight" ranks by weight norms (no data); "activation" by each head's/neuron's expected
        squared contribution to the block output on calibration data (compression/structure.py).
    refit: re-fit the following projection (attention output / FFN output) and its bias by ridge least
        squares on calibration data so the kept inputs reproduce the full layer output.
    The default (weight, no re-fit) is the behaviour of plans and recipes that do not say otherwise.
    """

    importance: StructureImportance = "weight"
    refit: bool = False

    def __post_init__(self) -> None:
        if self.importance not in ("weight", "activation"):
            raise PlanError(f"structure importance must be 'weight' or 'activation' (got {self.importance!r})")

    @property
    def needs_data(self) -> bool:
        return self.importance == "activation" or self.refit


@dataclass(frozen=True)
class SharingSpec:
    """Cross-layer weight sharing: each group's lowest layer supplies the weights of the whole group."""

    groups: tuple[tuple[int, ...], ...] = ()
    scope: SharingScope = "block"

    def __post_init__(self) -> None:
        if self.scope not in ("attention", "ffn", "block"):
            raise PlanError(f"sharing scope must be attention, ffn or block (got {self.scope!r})")
        object.__setattr__(self, "groups", tuple(tuple(sorted(g)) for g in self.groups))
        seen: set[int] = set()
        for g in self.groups:
            if len(g) < 2:
                raise PlanError(f"a sharing group needs at least two layers (got {list(g)})")
            if seen & set(g):
                raise PlanError(f"layer(s) {sorted(seen & set(g))} appear in two sharing groups")
            seen |= set(g)

    def representative(self, layer: int) -> int:
        """The layer whose weights `layer` uses (itself when it is not shared)."""
        for g in self.groups:
            if layer in g:
                return g[0]
        return layer


def sharing_pattern(pattern: str, num_layers: int, scope: SharingScope = "block") -> SharingSpec:
    """Named sharing patterns: 'none', 'pairs' (0-1, 2-3, ...), 'cycleK' (layer i shares with i mod K)."""
    if pattern == "none":
        return SharingSpec()
    if pattern == "pairs":
        groups = tuple((i, i + 1) for i in range(0, num_layers - 1, 2))
        return SharingSpec(groups=groups, scope=scope)
    if pattern.startswith("cycle") and pattern[5:].isdigit():
        k = int(pattern[5:])
        if not 1 <= k < num_layers:
            raise PlanError(f"sharing pattern {pattern!r} needs 1 <= K < {num_layers} layers")
        groups = tuple(
            tuple(range(r, num_layers, k)) for r in range(k) if len(range(r, num_layers, k)) > 1
        )
        return SharingSpec(groups=groups, scope=scope)
    raise PlanError(f"unknown sharing pattern {pattern!r}; use none, pairs or cycleK (e.g. cycle3)")


@dataclass(frozen=True)
class CompressionPlan:
    """A full assignment: unit name -> UnitSpec, layer index -> LayerSpec, sharing, and how structured
    pruning picks and corrects (`structure`, meaningful only when some layer drops heads or neurons).

    Units and layers that are absent keep their identity setting.
    """

    units: dict[str, UnitSpec] = field(default_factory=dict)
    layers: dict[int, LayerSpec] = field(default_factory=dict)
    sharing: SharingSpec = field(default_factory=SharingSpec)
    structure: StructureSpec = field(default_factory=StructureSpec)

    def unit(self, name: str) -> UnitSpec:
        return self.units.get(name, UnitSpec())

    def layer(self, index: int) -> LayerSpec:
        return self.layers.get(index, LayerSpec())

    def with_units(self, **changes: UnitSpec) -> CompressionPlan:
        return replace(self, units={**self.units, **changes})

    @property
    def is_identity(self) -> bool:
        return (
            all(s.is_identity for s in self.units.values())
            and all(v == LayerSpec() for v in self.layers.values())
            and not self.sharing.groups
        )
