"""SearchConfig validation (one-line ConfigErrors naming the key) and budget conversion."""

from __future__ import annotations

import re

import pytest
import yaml

from slimformer.errors import ConfigError, SlimformerError
from slimformer.search.config import QUICKSTART_CONFIG, BudgetConfig, SearchConfig


def _base() -> dict:
    return {
        "model": "some/model",
        "space": {"groups": [{"select": {"role": ["embedding"]}, "bits": [8, 4]}]},
        "budget": {"memory": "15%"},
    }


def _yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg)


def _error(cfg: dict | str) -> str:
    text = cfg if isinstance(cfg, str) else _yaml(cfg)
    with pytest.raises(ConfigError) as info:
        SearchConfig.from_yaml(text, source="cfg.yaml")
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    assert msg.startswith("cfg.yaml: "), "errors name the source"
    return msg


def test_minimal_config_validates_with_defaults() -> None:
    cfg = SearchConfig.from_yaml(_yaml(_base()))
    assert cfg.objectives == ["quality", "latency", "memory"]
    assert cfg.budget.memory == "15%"
    assert cfg.space.groups[0].bits == [8, 4]


def test_quickstart_config_loads_and_round_trips() -> None:
    cfg = SearchConfig.load(None)
    assert cfg == SearchConfig.load(QUICKSTART_CONFIG)
    assert SearchConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize(("path", "key_path"), [
    ((), "trails"),
    (("data",), "data.search_sample"),
    (("budget",), "budget.memmory"),
    (("sampler",), "sampler.populaton_size"),
    (("space",), "space.per_layers"),
    (("space", "groups", 0), "space.groups.0.bitz"),
    (("space", "groups", 0, "select"), "space.groups.0.select.rol"),
])
def test_unknown_key_anywhere_names_the_key_path(path: tuple, key_path: str) -> None:
    cfg = _base()
    cfg.setdefault("data", {})
    cfg.setdefault("sampler", {})
    node = cfg
    for p in path:
        node = node[p]
    node[key_path.rsplit(".", 1)[-1]] = 1
    msg = _error(cfg)
    assert key_path in msg
    assert "unknown key" in msg


@pytest.mark.parametrize(("field", "value", "key_path"), [
    ("trials", "eight", "trials"),
    ("trials", 0, "trials"),
    ("threads", "many", "threads"),
    ("baselines", "perhaps", "baselines"),
    ("data", {"batch_size": "big"}, "data.batch_size"),
    ("sampler", {"name": "annealing"}, "sampler.name"),
    ("space", {"groups": [{"bits": [6]}]}, "space.groups.0.bits"),
    ("space", {"groups": [{"rank_fraction": [1.5]}]}, "space.groups.0.rank_fraction"),
    ("space", {"groups": []}, "space.groups"),
    ("space", "all of it", "space"),
    ("budget", {"memory": [15]}, "budget.memory"),
])
def test_wrong_type_or_value_names_the_key(field: str, value: object, key_path: str) -> None:
    cfg = _base()
    cfg[field] = value
    msg = _error(cfg)
    assert re.search(rf": {re.escape(key_path)}[.:]", msg), msg  # e.g. "space.groups.0.bits.0: Input ..."


def test_missing_required_key_is_named() -> None:
    cfg = _base()
    del cfg["budget"]
    assert ": budget: " in _error(cfg)


@pytest.mark.parametrize("objectives", [["latency", "memory"], ["memory"], ["quality", "quality"]])
def test_objectives_must_include_quality_once(objectives: list[str]) -> None:
    cfg = _base()
    cfg["objectives"] = objectives
    msg = _error(cfg)
    assert "objectives" in msg and "quality" in msg


def test_objectives_subset_with_quality_is_fine() -> None:
    cfg = _base()
    cfg["objectives"] = ["quality", "memory"]
    assert SearchConfig.from_yaml(_yaml(cfg)).objectives == ["quality", "memory"]


@pytest.mark.parametrize("text", ["model: [unclosed", "- just\n- a list\n", "plain string", ""])
def test_not_a_mapping_or_not_yaml(text: str) -> None:
    _error(text)


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        SearchConfig.load(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize(("memory", "fp32", "expected"), [
    ("15%", 1_000_000, 150_000),
    ("15 %", 1_000_000, 150_000),
    ("2.5%", 4_000_000, 100_000),
    ("12MB", 0, 12_000_000),
    ("12mb", 0, 12_000_000),
    ("900KiB", 0, 900 * 1024),
    ("900KB", 0, 900_000),
    ("1.5MiB", 0, 3 * 512 * 1024),
    ("1GB", 0, 1_000_000_000),
    ("2048", 0, 2048),
    ("2048B", 0, 2048),
    (12345, 10**9, 12345),
])
def test_budget_to_bytes(memory: str | int, fp32: int, expected: int) -> None:
    assert BudgetConfig(memory=memory).to_bytes(fp32) == expected


@pytest.mark.parametrize("memory", ["15 potatoes", "12 MBs", "%15", "fifteen percent", "1e3MB"])
def test_unparseable_budget_is_rejected_on_construction(memory: str) -> None:
    with pytest.raises(ValueError, match="positive percentage of fp32"):
        BudgetConfig(memory=memory)


@pytest.mark.parametrize("memory", ["15 potatoes", -5])
def test_bad_budget_is_rejected_by_from_yaml(memory: str | int) -> None:
    cfg = _base()
    cfg["budget"] = {"memory": memory}
    try:
        SearchConfig.from_yaml(_yaml(cfg), source="cfg.yaml")
    except SlimformerError as exc:
        assert "budget.memory" in str(exc)
        return
    raise AssertionError(f"budget.memory {memory!r} was accepted by SearchConfig.from_yaml")


@pytest.mark.parametrize(("memory", "fp32", "expected"), [("29%", 100, 29), ("57%", 100, 57)])
def test_percent_budget_is_exact(memory: str, fp32: int, expected: int) -> None:
    assert BudgetConfig(memory=memory).to_bytes(fp32) == expected


# ------------------------------------------------------------------------------------------- budget.latency


@pytest.mark.parametrize(("latency", "fp32_ms", "expected"), [
    ("8ms", None, 8.0),
    ("8 ms", None, 8.0),
    ("0.25s", None, 250.0),
    ("800us", None, 0.8),
    ("1.5MS", None, 1.5),
    ("0.5x", 30.0, 15.0),
    ("2x", 1.5, 3.0),
])
def test_latency_budget_forms(latency: str, fp32_ms: float | None, expected: float) -> None:
    b = BudgetConfig(memory="15%", latency=latency)
    assert b.latency_ms(fp32_ms) == pytest.approx(expected)
    assert b.latency_is_relative == latency.endswith("x")


def test_no_latency_budget_by_default() -> None:
    b = BudgetConfig(memory="15%")
    assert b.latency is None and b.latency_ms(10.0) is None and not b.latency_is_relative


@pytest.mark.parametrize("latency", ["0x", "0ms", "-1ms", "-0.5x", "8", 8, 0.5, "8 potatoes", "8min", "5 hours",
                                     "ms", "x", "nanms", "1e3ms", True])
def test_bad_latency_budget_is_one_line_naming_the_field_and_the_forms(latency: object) -> None:
    cfg = _base()
    cfg["budget"] = {"memory": "15%", "latency": latency}
    msg = _error(cfg)
    assert re.search(r"budget\.latency: .*write a positive time like '8ms', '0\.25s', '800us' or a multiple of the "
                     r"fp32 model's latency like '0\.5x'", msg), msg
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: budget\.latency: .*'8ms'.*'0\.5x'"):
        SearchConfig.from_yaml(_yaml(cfg), source="cfg.yaml")
