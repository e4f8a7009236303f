"""SearchSpace on a tiny real BERT: parameters, unit selection, plan decoding, minimum plan, seeds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import helpers  # noqa: E402

from slimformer.compression.memory import plan_memory  # noqa: E402
from slimformer.compression.plan import CompressionPlan, LayerSpec, SharingSpec, UnitSpec  # noqa: E402
from slimformer.errors import ConfigError  # noqa: E402
from slimformer.models import load  # noqa: E402
from slimformer.spaces.config import SpaceConfig  # noqa: E402
from slimformer.spaces.space import SearchSpace  # noqa: E402

TINY_SPACE = {"groups": [
    {"select": {"role": ["embedding"]}, "bits": [8, 4], "group_size": [16, 32]},
    {"select": {"role": helpers.LINEAR_ROLES}, "bits": [8, 4], "rank_fraction": [1.0, 0.5]},
]}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory):
    return load(str(helpers.tiny_model_dir(tmp_path_factory)))


@pytest.fixture(scope="module")
def adapter4(tmp_path_factory: pytest.TempPathFactory):
    """A 4-layer variant (sharing patterns such as cycle2 need more than two layers)."""
    return load(str(helpers.tiny_model_dir(tmp_path_factory, num_layers=4)))


def space(adapter: Any, cfg: dict[str, Any]) -> SearchSpace:
    return SearchSpace(adapter, SpaceConfig.model_validate(cfg))


def sample_params(sp: SearchSpace, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n parameter sets drawn by a real Optuna study (RandomSampler), as the search stores them."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    study.optimize(lambda t: (sp.suggest(t), 0.0)[1], n_trials=n)
    return [t.params for t in study.trials]


def bytes_of(adapter: Any, plan: CompressionPlan) -> int:
    return plan_memory(adapter, plan).total_bytes


optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------------------- parameters


def test_distributions_are_categorical_with_declared_choices(adapter) -> None:
    sp = space(adapter, TINY_SPACE)
    dists = sp.distributions()
    assert dists, "the tiny space has parameters"
    for name, d in dists.items():
        assert isinstance(d, CategoricalDistribution)
        key = name.rsplit(".", 1)[-1]
        group = int(name.split(".")[0][1:])
        assert list(d.choices) == TINY_SPACE["groups"][group][key]
    assert sp.size() == 2 ** len(dists)


def test_single_choice_dimensions_are_not_parameters(adapter) -> None:
    sp = space(adapter, {"groups": [{"bits": [4], "group_size": [16]}]})
    assert sp.distributions() == {}
    assert sp.size() == 1
    plan = sp.plan_from_params({})
    assert set(plan.units) == set(adapter.unit_names)
    assert all(s == UnitSpec(bits=4, group_size=16) for s in plan.units.values())


def test_per_layer_true_gives_one_parameter_per_layer_per_group(adapter) -> None:
    sp = space(adapter, {**TINY_SPACE, "per_layer": True})
    assert set(sp.distributions()) == {
        "g0.emb.bits", "g0.emb.group_size",
        "g1.L0.bits", "g1.L0.rank_fraction", "g1.L1.bits", "g1.L1.rank_fraction",
    }


def test_per_layer_false_gives_one_parameter_per_group(adapter) -> None:
    sp = space(adapter, {**TINY_SPACE, "per_layer": False})
    assert set(sp.distributions()) == {"g0.bits", "g0.group_size", "g1.bits", "g1.rank_fraction"}


def test_group_per_layer_overrides_space_setting(adapter) -> None:
    groups = [dict(TINY_SPACE["groups"][0]), {**TINY_SPACE["groups"][1], "per_layer": False}]
    sp = space(adapter, {"groups": groups, "per_layer": True})
    assert set(sp.distributions()) == {"g0.emb.bits", "g0.emb.group_size", "g1.bits", "g1.rank_fraction"}


# ----------------------------------------------------------------------------------------- selection


def _bundle_units(sp: SearchSpace, group: int) -> set[str]:
    return {u.name for b in sp.bundles if b.prefix.split(".")[0] == f"g{group}" for u in b.units}


def test_select_by_role(adapter) -> None:
    sp = space(adapter, {"groups": [{"select": {"role": ["ffn_in", "ffn_out"]}, "bits": [8, 4]}]})
    expected = {u.name for u in adapter.units if u.role in ("ffn_in", "ffn_out")}
    assert len(expected) == 4
    assert _bundle_units(sp, 0) == expected


def test_select_by_layer_range(adapter) -> None:
    sp = space(adapter, {"groups": [{"select": {"layers": "0-0"}, "bits": [8, 4]}], "per_layer": False})
    assert _bundle_units(sp, 0) == {u.name for u in adapter.units if u.layer == 0}
    plan = sp.plan_from_params({"g0.bits": 4})
    assert set(plan.units) == {u.name for u in adapter.units if u.layer == 0}


def test_select_by_layer_list_and_role_together(adapter) -> None:
    sp = space(adapter, {"groups": [{"select": {"layers": [1], "role": ["query"]}, "bits": [8, 4]}]})
    assert _bundle_units(sp, 0) == {"encoder.layer.1.attention.self.query"}


def test_select_by_regex(adapter) -> None:
    sp = space(adapter, {"groups": [{"select": {"regex": r"attention\.self\.(key|value)$"}, "bits": [8, 4]}]})
    assert _bundle_units(sp, 0) == {f"encoder.layer.{i}.attention.self.{k}" for i in (0, 1)
                                    for k in ("key", "value")}


def test_empty_select_covers_units_not_claimed_by_earlier_groups(adapter) -> None:
    sp = space(adapter, {"groups": [{"select": {"role": ["embedding"]}, "bits": [8, 4]}, {"bits": [8, 4]}]})
    assert _bundle_units(sp, 0) == {"embeddings.word_embeddings"}
    assert _bundle_units(sp, 1) == set(adapter.unit_names) - {"embeddings.word_embeddings"}


@pytest.mark.parametrize("select", [
    {"role": ["qkv"]},
    {"layers": "5-7"},
    {"regex": "no_such_module"},
    {"role": ["embedding"], "layers": "0"},
])
def test_select_matching_nothing_is_a_config_error(adapter, select: dict) -> None:
    with pytest.raises(ConfigError, match=r"space\.groups\[0\]\.select matches no unit"):
        space(adapter, {"groups": [{"select": select, "bits": [8, 4]}]})


def test_select_of_already_claimed_units_is_a_config_error(adapter) -> None:
    with pytest.raises(ConfigError, match=r"space\.groups\[1\]\.select matches no unit"):
        space(adapter, {"groups": [{"bits": [8, 4]}, {"select": {"role": ["query"]}, "bits": [4]}]})


def test_two_groups_choosing_heads_for_one_layer_is_a_config_error(adapter) -> None:
    with pytest.raises(ConfigError, match=r"space\.groups\[0\] and space\.groups\[1\] both choose heads_kept "
                                          r"for layer 0; set heads_kept in one group only"):
        space(adapter, {"groups": [{"select": {"role": ["query"]}, "heads_kept": [2, 4]},
                                   {"select": {"role": ["key"]}, "heads_kept": [1, 4]}]})
    # one group per layer is fine, and so is one group deciding heads and another neurons
    sp = space(adapter, {"groups": [{"select": {"role": ["query"], "layers": [0]}, "heads_kept": [2, 4]},
                                    {"select": {"role": ["key"], "layers": [1]}, "heads_kept": [1, 4]},
                                    {"select": {"role": ["ffn_in"]}, "neurons_kept": [0.5, 1.0]}]})
    assert {"g0.L0.heads_kept", "g1.L1.heads_kept", "g2.L0.neurons_kept"} <= set(sp.distributions())


def test_2_4_sparsity_needs_input_dims_divisible_by_4(adapter) -> None:
    ok = space(adapter, {"groups": [{"select": {"role": ["query"]}, "sparsity": [0.0, "2:4"],
                                     "rank_fraction": [1.0, 0.5]}]})  # in-dim 32, rank 16
    assert "g0.L0.sparsity" in ok.distributions()
    with pytest.raises(ConfigError, match=r"space\.groups\[0\]\.sparsity '2:4' needs input dimensions divisible "
                                          r"by 4, but unit .*query.* would store \[10\]"):
        space(adapter, {"groups": [{"select": {"role": ["query"]}, "sparsity": ["2:4"], "rank_fraction": [0.3]}]})


# ---------------------------------------------------------------------------------------- decoding


def test_plan_from_trial_params_equals_the_suggested_plan(adapter) -> None:
    sp = space(adapter, TINY_SPACE)
    suggested: dict[int, CompressionPlan] = {}

    def objective(trial: optuna.Trial) -> float:
        suggested[trial.number] = sp.suggest(trial)
        return 0.0

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(objective, n_trials=12)
    assert len({repr(sorted(t.params.items())) for t in study.trials}) > 1
    for t in study.trials:
        assert sp.plan_from_params(t.params) == suggested[t.number]


def test_fixed_trial_replays_a_plan(adapter) -> None:
    sp = space(adapter, TINY_SPACE)
    params = {"g0.emb.bits": 4, "g0.emb.group_size": 32, "g1.L0.bits": 8, "g1.L0.rank_fraction": 0.5,
              "g1.L1.bits": 4, "g1.L1.rank_fraction": 1.0}
    plan = sp.suggest(optuna.trial.FixedTrial(params))
    assert plan == sp.plan_from_params(params)
    assert plan.unit("embeddings.word_embeddings") == UnitSpec(bits=4, group_size=32)
    assert plan.unit("encoder.layer.1.attention.self.query") == UnitSpec(bits=4)
    q0 = plan.unit("encoder.layer.0.attention.self.query")
    assert (q0.bits, q0.rank) == (8, 16)
    assert plan.unit("encoder.layer.0.intermediate.dense").rank == 16  # half of min(64, 32)


def test_uniform_setting_is_expressible(adapter) -> None:
    sp = space(adapter, {"groups": [{"bits": [8, 4], "group_size": [16, 32]}], "per_layer": False})
    assert set(sp.distributions()) == {"g0.bits", "g0.group_size"}
    for bits in (8, 4):
        for g in (16, 32):
            plan = sp.plan_from_params({"g0.bits": bits, "g0.group_size": g})
            assert set(plan.units) == set(adapter.unit_names)
            assert set(plan.units.values()) == {UnitSpec(bits=bits, group_size=g)}


# ------------------------------------------------------------------------------------ minimum plan


RICH_SPACE = {"groups": [
    {"select": {"role": ["embedding"]}, "bits": [32, 8, 4], "group_size": [16, 32, None],
     "rank_fraction": [1.0, 0.5]},
    {"select": {"role": ["query", "key", "value", "attn_out"]}, "bits": [16, 8, 4], "group_size": [16, None],
     "sparsity": [0.0, 0.3, "2:4"], "heads_kept": [4, 2]},
    {"select": {"role": ["ffn_in", "ffn_out"]}, "bits": [8, 4], "rank_fraction": [1.0, 0.75, 0.25],
     "neurons_kept": [1.0, 0.5]},
]}


@pytest.mark.parametrize("cfg", [TINY_SPACE, {**TINY_SPACE, "per_layer": False}, RICH_SPACE,
                                 {**RICH_SPACE, "sharing": ["none", "pairs"],
                                  "sharing_scope": ["attention", "ffn", "block"]}],
                         ids=["tiny", "tiny-per-group", "rich", "rich-sharing"])
def test_min_memory_plan_is_no_larger_than_any_sampled_plan(adapter, cfg: dict) -> None:
    sp = space(adapter, cfg)
    smallest = bytes_of(adapter, sp.min_memory_plan())
    for params in sample_params(sp, 20):
        assert smallest <= bytes_of(adapter, sp.plan_from_params(params)), params


def test_min_memory_plan_with_mixed_fraction_and_count_neurons(adapter) -> None:
    sp = space(adapter, {"groups": [{"select": {"role": ["ffn_in", "ffn_out"]}, "neurons_kept": [1.0, 16]}],
                         "per_layer": False})
    sixteen = bytes_of(adapter, sp.plan_from_params({"g0.neurons_kept": 16}))
    assert sixteen < bytes_of(adapter, CompressionPlan())
    assert bytes_of(adapter, sp.min_memory_plan()) <= sixteen


# ------------------------------------------------------------------------------ structure, sharing


def test_heads_and_neurons_choices_produce_layer_specs(adapter) -> None:
    sp = space(adapter, {"groups": [{"select": {"layers": "0-1"}, "heads_kept": [4, 2, 1],
                                     "neurons_kept": [1.0, 0.5, 8]}]})
    dists = sp.distributions()
    assert set(dists) >= {"g0.L0.heads_kept", "g0.L0.neurons_kept", "g0.L1.heads_kept", "g0.L1.neurons_kept"}
    plan = sp.plan_from_params({"g0.L0.heads_kept": 2, "g0.L0.neurons_kept": 0.5,
                                "g0.L1.heads_kept": 1, "g0.L1.neurons_kept": 8})
    assert plan.layer(0) == LayerSpec(heads_kept=2, neurons_kept=32)
    assert plan.layer(1) == LayerSpec(heads_kept=1, neurons_kept=8)
    full = sp.plan_from_params({"g0.L0.heads_kept": 4, "g0.L0.neurons_kept": 1.0,
                                "g0.L1.heads_kept": 4, "g0.L1.neurons_kept": 1.0})
    assert full.layer(0) == full.layer(1) == LayerSpec()
    assert full.is_identity
    assert bytes_of(adapter, plan) < bytes_of(adapter, full)


def test_heads_kept_per_group_applies_to_every_layer(adapter) -> None:
    sp = space(adapter, {"groups": [{"select": {"role": helpers.LINEAR_ROLES}, "heads_kept": [4, 2]}],
                         "per_layer": False})
    assert set(sp.distributions()) == {"g0.heads_kept"}
    plan = sp.plan_from_params({"g0.heads_kept": 2})
    assert plan.layer(0) == plan.layer(1) == LayerSpec(heads_kept=2)


@pytest.mark.parametrize("group", [{"heads_kept": [4, 8]}, {"neurons_kept": [1.0, 100]}])
def test_out_of_range_structure_choices_are_rejected_up_front(adapter, group: dict) -> None:
    with pytest.raises(ConfigError):
        space(adapter, {"groups": [group]})


def test_sharing_choices_produce_sharing_specs(adapter4) -> None:
    sp = space(adapter4, {"groups": [{"bits": [8, 4]}], "per_layer": False,
                          "sharing": ["none", "pairs", "cycle2"], "sharing_scope": ["attention", "block"]})
    d = sp.distributions()["sharing"]
    assert list(d.choices) == ["none", "pairs/attention", "pairs/block", "cycle2/attention", "cycle2/block"]
    assert sp.plan_from_params({"sharing": "none"}).sharing == SharingSpec()
    assert sp.plan_from_params({"sharing": "pairs/attention"}).sharing == \
        SharingSpec(groups=((0, 1), (2, 3)), scope="attention")
    assert sp.plan_from_params({"sharing": "cycle2/block"}).sharing == \
        SharingSpec(groups=((0, 2), (1, 3)), scope="block")
    base = bytes_of(adapter4, sp.plan_from_params({"g0.bits": 8, "sharing": "none"}))
    assert bytes_of(adapter4, sp.plan_from_params({"g0.bits": 8, "sharing": "cycle2/block"})) < base


def test_sharing_pattern_that_does_not_fit_the_layer_count_is_a_config_error(adapter) -> None:
    with pytest.raises(ConfigError, match="space.sharing"):
        space(adapter, {"groups": [{"bits": [8, 4]}], "sharing": ["none", "cycle2"]})  # 2 layers


# ----------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("percent", [18, 25, 40, 100])
def test_seed_params_are_within_budget_and_in_space(adapter, percent: int) -> None:
    sp = space(adapter, TINY_SPACE)
    fp32 = bytes_of(adapter, CompressionPlan())
    budget = fp32 * percent // 100
    seeds = sp.seed_params(budget)
    dists = sp.distributions()
    for params in seeds:
        assert set(params) == set(dists)
        assert all(v in dists[k].choices for k, v in params.items())
        assert bytes_of(adapter, sp.plan_from_params(params)) <= budget
    assert len({repr(sorted(p.items())) for p in seeds}) == len(seeds)
    if percent >= 40:  # every uniform start point (4 and 8 bits at group sizes 16 and 32) fits
        assert len(seeds) == 4
    else:
        assert len(seeds) >= 1


def test_seed_params_empty_when_nothing_fits(adapter) -> None:
    sp = space(adapter, TINY_SPACE)
    assert sp.seed_params(1) == []
