"""The search priced by the shipped calibrated profile: summary, trials and recipes say so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers import tiny_config, tiny_model_dir, write_config  # noqa: E402

from slimformer.api import search  # noqa: E402
from slimformer.errors import ConfigError  # noqa: E402
from slimformer.hardware_profiles import load_profile  # noqa: E402

SHIPPED = "amd-epyc-avx512-1t-ort1-32"


def test_search_with_the_calibrated_profile(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = tiny_model_dir(tmp_path_factory)
    # source calibrated: the shipped profile prices the search on any machine (with `auto` a machine of another
    # CPU would calibrate itself instead: test_auto_profile.py)
    cfg = tiny_config(model, tmp_path / "run", trials=3, baselines=False, hardware_profile=SHIPPED,
                      latency={"source": "calibrated", "batch": 1, "seq": 16})
    res = search(write_config(tmp_path / "s.yaml", cfg), progress=False)
    prof = load_profile(SHIPPED)
    assert res.summary.latency_source == "calibrated"
    assert res.summary.latency_label.startswith("calibrated") and prof.version in res.summary.latency_label
    assert res.summary.hardware_profile_version == prof.version
    recipe = yaml.safe_load(next((tmp_path / "run" / "recipes").glob("*.yaml")).read_text())
    assert recipe["hardware_profile"] == SHIPPED and recipe["hardware_profile_version"] == prof.version
    lat = [e["latency_ms_estimate"] for e in json.loads((tmp_path / "run" / "pareto.json").read_text())["trials"]]
    assert lat and all(v > 0 for v in lat)


def test_calibrated_source_needs_a_calibrated_profile(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
                                                      ) -> None:
    model = tiny_model_dir(tmp_path_factory)
    cfg = tiny_config(model, tmp_path / "run", trials=2, hardware_profile="amd-epyc-avx512-2t-torch",
                      latency={"source": "calibrated"})
    with pytest.raises(ConfigError, match="no calibrated latency model"):
        search(write_config(tmp_path / "s.yaml", cfg), progress=False)
    assert not (tmp_path / "run").exists()


def test_refit_residual_keeps_kernel_tables(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from slimformer.hardware_profiles.residual_fit import refit

    model = str(tiny_model_dir(tmp_path_factory))
    prof = load_profile(SHIPPED)
    new = refit(prof, (model,), tmp_path, shapes={model: ((1, 8),)})
    assert new.latency_model is not None and prof.latency_model is not None
    assert new.latency_model.linear == prof.latency_model.linear
    res = new.latency_model.residual["hf"]
    assert res.fitted_on and all(model in f for f in res.fitted_on)
    assert all(0.8 <= s <= 1.6 for s in res.class_scale.values())
    assert new.validation == [] and new.fingerprint != prof.fingerprint
