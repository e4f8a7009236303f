"""Recipes: the versioned YAML document that re-applies a chosen plan (see docs/RECIPES.md).

Rules match unit names exactly or by `re:` regex; the first matching rule wins; a rule that matches
no unit of the model is an error (it names a unit the model lacks). Unknown keys are rejected.
The writer is compact (one `re:` rule per distinct spec, spec fields at their defaults left out, in flow
style); the reader accepts that and the long form (one exact-name rule per unit, every field written) alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from slimformer.compression.embedding_tiers import TIER_BITS, TIERS_VERSION, Tier, TierSpec, TokenRanking
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, StructureSpec, UnitSpec
from slimformer.compression.plan_semantics import canonical_plan
from slimformer.compression.records import RecoveryRecord
from slimformer.compression.rule_patterns import matches_exactly, pattern_for
from slimformer.errors import PlanError, RecipeError
from slimformer.fileio import atomic_write, first_validation_error, read_text_file, yaml_mapping
from slimformer.models.base import ModelAdapter
from slimformer.schema import FrozenModel

RECIPE_VERSION = 2  # the newest version this slimformer reads; it reads every older one as well
# what each version added (a recipe is written with the lowest version that holds it, so older readers still
# read every recipe they can apply): 2 = bits 3 and 2, methods gptq-ao and recon
V2_BITS, V2_METHODS = (3, 2), ("gptq-ao", "recon")
MAX_WIDTH = 1 << 24  # bound on ranks, group sizes and kept counts: above any model, below any integer overflow


class SpecModel(FrozenModel):
    rank: int | None = Field(None, ge=1, le=MAX_WIDTH)
    sparsity: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False)
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    bits: Literal[32, 16, 8, 4, 3, 2] = 32  # 3 and 2: recipe version 2
    group_size: int | None = Field(None, ge=1, le=MAX_WIDTH)
    method: Literal["rtn", "gptq", "gptq-ao", "recon"] = "rtn"  # gptq-ao and recon: recipe version 2
    kernel: Literal["exact", "int8"] = "exact"  # written only when "int8" (recipes without it read as before)
    # SmoothQuant alpha of a kernel-int8 unit; written only when set (recipes without it apply unsmoothed, as
    # before). Like `kernel`, no version bump: a reader without the field rejects it as an unknown key
    smooth: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)

    def to_spec(self) -> UnitSpec:
        return UnitSpec(self.rank, self.sparsity, self.pattern, self.bits, self.group_size, self.method, self.kernel,
                        smooth=self.smooth)

    @classmethod
    def from_spec(cls, s: UnitSpec) -> SpecModel:
        return cls(rank=s.rank, sparsity=s.sparsity, pattern=s.pattern, bits=s.bits, group_size=s.group_size,
                   method=s.method, kernel=s.kernel, smooth=s.smooth)


class Rule(FrozenModel):
    match: str
    spec: SpecModel

    @field_validator("match")
    @classmethod
    def _valid_regex(cls, v: str) -> str:
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as exc:
                raise ValueError(f"invalid regex {v[3:]!r}: {exc}") from None
        return v

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.match[3:], name) is not None if self.match.startswith("re:") else \
            self.match == name


class LayerRule(FrozenModel):
    layer: int = Field(ge=0, le=MAX_WIDTH)
    heads_kept: int | None = Field(default=None, ge=1, le=MAX_WIDTH)
    neurons_kept: int | None = Field(default=None, ge=1, le=MAX_WIDTH)


class SharingModel(FrozenModel):
    groups: list[list[int]]
    scope: Literal["attention", "ffn", "block"] = "block"


class StructureModel(FrozenModel):
    """How the recipe's head/neuron pruning ranks and corrects (see StructureSpec); absent = weight, no re-fit."""

    importance: Literal["weight", "activation"] = "weight"
    refit: bool = False

    def to_spec(self) -> StructureSpec:
        return StructureSpec(self.importance, self.refit)


class TierModel(FrozenModel):
    """One precision tier of a tiered table (`rows` null: every remaining row; the last tier only)."""

    tier: str
    rows: int | None = Field(None, ge=1, le=MAX_WIDTH)
    group_size: int | None = Field(None, ge=2, le=MAX_WIDTH)

    @field_validator("tier")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in TIER_BITS:
            raise ValueError(f"unknown embedding tier {v!r}; tiers are {', '.join(TIER_BITS)}")
        return v


class RankingModel(FrozenModel):
    """Token ids by frequency on the reference corpus (`ids`: base64 zlib uint32, most frequent first)."""

    vocab: int = Field(ge=1, le=MAX_WIDTH)
    ids: str
    source: str = ""


class EmbeddingTiersModel(FrozenModel):
    """Frequency-aware precision of one embedding table (compression/embedding_tiers.py); versioned on its own."""

    version: int = TIERS_VERSION
    match: str
    ranking: RankingModel
    tiers: list[TierModel] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > TIERS_VERSION:
            raise ValueError(f"embedding_tiers version {v} is newer than this slimformer reads ({TIERS_VERSION}); "
                             "upgrade slimformer")
        return v

    @model_validator(mode="after")
    def _pq_needs_v2(self) -> EmbeddingTiersModel:
        if self.version < 2 and any(t.tier == "pq" for t in self.tiers):
            raise ValueError("tier pq needs `version: 2` (written by a newer slimformer)")
        return self

    def to_spec(self) -> TierSpec:
        ranking = TokenRanking(self.ranking.vocab, TokenRanking.decode_ids(self.ranking.ids), self.ranking.source)
        return TierSpec(tuple(Tier(t.tier, t.rows, t.group_size) for t in self.tiers), ranking)

    @classmethod
    def from_spec(cls, match: str, spec: TierSpec) -> EmbeddingTiersModel:
        r = spec.ranking
        version = 2 if any(t.name == "pq" for t in spec.tiers) else 1  # the lowest version that holds it
        return cls(version=version, match=match,
                   ranking=RankingModel(vocab=r.vocab, ids=r.encode_ids(), source=r.source),
                   tiers=[TierModel(tier=t.name, rows=t.rows, group_size=t.group_size) for t in spec.tiers])


class ModelRef(FrozenModel):
    id: str
    sha256: str | None = None


class ProvenanceBudget(FrozenModel):
    """The memory budget a search held its plans to, and the artifact it applies to (`deploy`):
    `apply --onnx` checks the written ONNX file against it for deploy onnx."""

    bytes: int = Field(ge=1)
    deploy: Literal["onnx", "safetensors"] = "safetensors"


class Provenance(FrozenModel):
    """Where a recipe came from, as a search writes it (search/results.py RecipeProvenance.to_json): the study,
    its storage URL (password masked), the trial, its metric values, package versions and the time. Every key is
    optional (a hand-written recipe has none); no other keys, and metrics are numbers, so a recipe holds no
    free-form data."""

    study: str | None = None
    storage: str | None = None
    trial: int | None = None
    metrics: dict[str, int | float] = {}
    versions: dict[str, str] = {}
    created: str | None = None
    budget: ProvenanceBudget | None = None

    @field_validator("storage")
    @classmethod
    def _masked(cls, v: str | None) -> str | None:
        return None if v is None else _USERINFO.sub(r"\1:***@", v, count=1)  # never keep a password


_USERINFO = re.compile(r"(://[^/@:]*):[^/]*@")  # = search.storage: scheme://user:password@


class Recipe(FrozenModel):
    """A compression recipe. `provenance` records where it came from (Provenance: typed keys only)."""

    slimformer_recipe: int = RECIPE_VERSION
    model: ModelRef
    hardware_profile: str | None = None
    hardware_profile_version: str | None = None  # HardwareProfile.version: schema, date, fingerprint
    rules: list[Rule] = []
    layers: list[LayerRule] = []
    sharing: SharingModel | None = None
    structure: StructureModel | None = None  # data-driven head/neuron pruning; absent: weight norms, no re-fit
    embedding_tiers: EmbeddingTiersModel | None = None  # per-row precision of the token table; absent: none
    provenance: Provenance = Provenance()
    recovery: RecoveryRecord | None = None  # distillation the saved weights went through (slimformer.recovery)

    @field_validator("slimformer_recipe")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > RECIPE_VERSION:
            raise ValueError(f"recipe version {v} is newer than this slimformer reads (versions 1 to "
                             f"{RECIPE_VERSION}); upgrade slimformer (pip install -U slimformer) to apply it")
        if v < 1:
            raise ValueError(f"unsupported recipe version {v}; recipe versions start at 1")
        return v

    # -- plan <-> recipe ---------------------------------------------------------------------------
    def to_plan(self, adapter: ModelAdapter) -> CompressionPlan:
        """Resolve rules against the model's units (first match wins); unmatched rules are errors."""
        units: dict[str, UnitSpec] = {}
        used = [False] * len(self.rules)
        try:
            for name in adapter.unit_names:
                for i, rule in enumerate(self.rules):
                    if rule.matches(name):
                        used[i] = True
                        units[name] = rule.spec.to_spec()
                        break
            unmatched = [r.match for r, u in zip(self.rules, used) if not u]
            if unmatched:
                raise RecipeError(f"recipe rule(s) match no unit of {adapter.model_id}: {unmatched[:3]}; "
                                  "run `slimformer inspect MODEL` for the unit names")
            n = len(adapter.layers)
            bad = [lr.layer for lr in self.layers if lr.layer >= n]
            if bad:
                raise RecipeError(f"recipe layers {bad} do not exist; {adapter.model_id} has layers 0..{n - 1}")
            layers = {lr.layer: LayerSpec(lr.heads_kept, lr.neurons_kept) for lr in self.layers}
            sharing = SharingSpec() if self.sharing is None else SharingSpec(
                tuple(tuple(g) for g in self.sharing.groups), self.sharing.scope)
            structure = StructureSpec() if self.structure is None else self.structure.to_spec()
            if self.embedding_tiers is not None:  # the tiers decide the table's precision (rules matching it aside)
                et = self.embedding_tiers
                if et.match not in adapter.unit_names or adapter.unit(et.match).kind != "embedding":
                    raise RecipeError(f"embedding_tiers.match {et.match!r} is not an embedding table of "
                                      f"{adapter.model_id}; run `slimformer inspect MODEL` for the unit names")
                rows = adapter.unit(et.match).shape[0]
                if et.ranking.vocab != rows:
                    raise RecipeError(f"embedding_tiers.ranking.vocab {et.ranking.vocab} != the {rows} rows of "
                                      f"{et.match}; the recipe was made for another tokenizer")
                units[et.match] = UnitSpec(tiers=et.to_spec())
            plan = CompressionPlan(units, layers, sharing, structure)
        except PlanError as exc:
            raise RecipeError(f"recipe does not fit {adapter.model_id}: {exc}") from None
        try:
            return canonical_plan(adapter, plan)
        except PlanError as exc:
            raise RecipeError(f"recipe does not fit {adapter.model_id}: {exc}") from None

    @classmethod
    def from_plan(cls, plan: CompressionPlan, adapter: ModelAdapter, hardware_profile: str | None = None,
                  provenance: Provenance | Mapping[str, Any] | None = None,
                  hardware_profile_version: str | None = None,
                  compact: bool = True) -> Recipe:
        """Rules for the compressed units of the canonical plan (units shared away carry their representative's
        spec). `compact`: one rule per distinct spec (an exact name for a single unit, else the shortest `re:`
        pattern that matches exactly those units; rule_patterns.py), ordered by the first unit in model order;
        otherwise one exact-name rule per unit, in model order. Identity units get no rule either way."""
        plan = canonical_plan(adapter, plan)
        names = list(adapter.unit_names)
        tiered = [n for n in names if n in plan.units and plan.units[n].tiers is not None]
        if len(tiered) > 1:
            raise PlanError(f"a recipe carries the tiers of one embedding table; the plan tiers {tiered}")
        tiers = None if not tiered else EmbeddingTiersModel.from_spec(tiered[0], plan.units[tiered[0]].tiers)  # type: ignore[arg-type]
        kept = [n for n in names if n in plan.units and not plan.units[n].is_identity and n not in tiered]
        rules = [Rule(match=n, spec=SpecModel.from_spec(plan.units[n])) for n in kept] if not compact \
            else _compact_rules({n: plan.units[n] for n in kept}, names)
        layers = [LayerRule(layer=i, heads_kept=s.heads_kept, neurons_kept=s.neurons_kept)
                  for i, s in sorted(plan.layers.items()) if s != LayerSpec()]
        sharing = None if not plan.sharing.groups else SharingModel(
            groups=[list(g) for g in plan.sharing.groups], scope=plan.sharing.scope)
        structure = None if plan.structure == StructureSpec() else StructureModel(
            importance=plan.structure.importance, refit=plan.structure.refit)
        return cls(slimformer_recipe=needed_version(plan.units.values()),
                   model=ModelRef(id=adapter.model_id, sha256=adapter.weights_sha256()),
                   hardware_profile=hardware_profile, hardware_profile_version=hardware_profile_version,
                   rules=rules, layers=layers, sharing=sharing, structure=structure, embedding_tiers=tiers,
                   provenance=Provenance.model_validate(provenance or {}))

    # -- YAML ----------------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        """YAML with each rule's spec on one line (fields at their defaults left out) and empty sections left
        out; `from_yaml` reads it back to an equal Recipe."""
        data = self.model_dump(mode="json", exclude_none=False)
        data["provenance"] = self.provenance.model_dump(mode="json", exclude_defaults=True)  # the keys written
        for key, empty in (("hardware_profile", None), ("hardware_profile_version", None), ("recovery", None),
                           ("structure", None), ("sharing", None), ("layers", []), ("provenance", {}),
                           ("embedding_tiers", None)):
            if key in data and data[key] == empty:
                del data[key]  # the reader's default
        data["rules"] = [{"match": r.match, "spec": _Flow(r.spec.model_dump(mode="json", exclude_defaults=True))}
                         for r in self.rules]
        if self.layers:
            data["layers"] = [_Flow(lr.model_dump(mode="json", exclude_none=True)) for lr in self.layers]
        if self.embedding_tiers is not None:
            data["embedding_tiers"]["tiers"] = [_Flow(t.model_dump(mode="json", exclude_none=True))
                                                for t in self.embedding_tiers.tiers]
        return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False, width=120, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> Recipe:
        data = yaml_mapping(text, source, RecipeError,
                            "a recipe is a YAML mapping with slimformer_recipe, model and rules")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{source}: {first_validation_error(exc)}") from None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        p = Path(path)
        return cls.from_yaml(read_text_file(p, "recipe file", RecipeError), source=str(p))

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), self.to_yaml())



def needed_version(specs: Iterable[UnitSpec]) -> int:
    """The lowest recipe version that holds these unit specs (1 unless they use a version-2 field value)."""
    return 2 if any(s.bits in V2_BITS or s.method in V2_METHODS for s in specs) else 1


class _Flow(dict):  # type: ignore[type-arg]
    """A mapping written in YAML flow style (`{bits: 4, group_size: 32}`)."""


class _RecipeDumper(yaml.SafeDumper):
    """yaml.safe_dump, plus `_Flow` mappings on one line."""


_RecipeDumper.add_representer(
    _Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", dict(v), flow_style=True))


def _compact_rules(specs: dict[str, UnitSpec], names: list[str]) -> list[Rule]:
    """One rule per distinct spec (see Recipe.from_plan); a pattern that would not match exactly its units
    among `names` (cannot happen for well-formed names, checked anyway) falls back to exact-name rules."""
    by_spec: dict[UnitSpec, list[str]] = {}
    for n, s in specs.items():
        by_spec.setdefault(s, []).append(n)
    order = {n: i for i, n in enumerate(names)}
    rules: list[tuple[int, Rule]] = []
    for spec, units in by_spec.items():
        sm = SpecModel.from_spec(spec)
        if len(units) == 1:
            rules.append((order[units[0]], Rule(match=units[0], spec=sm)))
            continue
        pat = pattern_for(units, names)
        if matches_exactly(pat, units, names):
            rules.append((min(order[u] for u in units), Rule(match=f"re:{pat}", spec=sm)))
        else:  # pragma: no cover - defensive
            rules += [(order[u], Rule(match=u, spec=sm)) for u in units]
    return [r for _, r in sorted(rules, key=lambda x: x[0])]
