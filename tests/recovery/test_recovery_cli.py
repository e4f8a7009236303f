"""`slimformer apply --recover` and the search's `recover:` stage on the tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import invoke, tiny_config, write_config
from helpers import tiny_model_dir as _tiny_model_dir

from slimformer.api import search
from slimformer.compression.plan import CompressionPlan, UnitSpec
from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_any
from slimformer.models import load


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def int4_recipe(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    adapter = load(str(tiny_model_dir))
    plan = CompressionPlan({u.name: UnitSpec(bits=4, group_size=16, sparsity=0.5 if u.role == "ffn_in" else 0.0)
                            for u in adapter.units})
    path = tmp_path_factory.mktemp("recipe") / "int4.yaml"
    Recipe.from_plan(plan, adapter).save(path)
    return path


def test_apply_recover_writes_the_record_and_a_loadable_model(int4_recipe: Path, tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = invoke("apply", int4_recipe, "--model", tiny_model_dir, "--out", out, "--samples", 16, "--recover",
                 "--steps", 3, "--onnx")
    assert res.exit_code == 0, res.stderr
    assert "recovery: 3 steps" in res.stdout and "fidelity on 16 held-out samples" in res.stdout
    assert (out / "onnx" / "model.onnx").is_file()
    saved = Recipe.load(out / "slimformer.yaml")
    assert saved.rules == Recipe.load(int4_recipe).rules
    rec = saved.recovery
    assert rec is not None and rec.steps == 3 and rec.settings["steps"] == 3 and rec.eval_samples == 16
    assert set(rec.before) == set(rec.after) == {"cosine", "neighbours"}
    assert rec.train_samples == 3 * rec.settings["batch_size"] == 3 * 32  # steps x the default batch
    assert "recovery" not in yaml.safe_load(int4_recipe.read_text())  # recipes without recovery read as before
    loaded = load_any(str(out))
    assert loaded.recipe.recovery == rec  # type: ignore[attr-defined]


@pytest.mark.parametrize("args, needle", [
    (["--steps", "3"], "add --recover"),
    (["--recover", "--steps", "3", "--minutes", "1"], "steps or minutes, not both"),
    (["--recover", "--recover-data", "nope.txt"], "nope.txt"),
    (["--recover", "--recover-data", "fortunes+python-docs*0"], "repeat count '0'"),
    (["--recover", "--recover-data", "fortunes+nope.txt"], "nope.txt"),
])
def test_bad_recovery_options_exit_2(int4_recipe: Path, tiny_model_dir: Path, tmp_path: Path, args: list[str],
                                     needle: str) -> None:
    res = invoke("apply", int4_recipe, "--model", tiny_model_dir, "--out", tmp_path / "o", "--samples", 8, *args)
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def test_search_recovers_the_top_plans(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", trials=4, baselines=False,
                      recover={"top_k": 2, "steps": 2, "samples": 32, "batch_size": 8})
    result = search(write_config(tmp_path / "search.yaml", cfg), progress=False)
    pareto = json.loads((result.run_dir / "pareto.json").read_text())
    recovered = [e for e in pareto["trials"] if "recovery" in e]
    assert 1 <= len(recovered) <= 2
    for e in recovered:
        assert e["recovery"]["before"] == pytest.approx(e["heldout_metrics"])
        assert e["recovery"]["steps"] == 2
        assert Recipe.load(result.run_dir / e["recipe"]).recovery is not None
    summary = result.summary.recovery
    assert summary is not None
    assert {r.trial for r in summary.trials} == {e["trial"] for e in recovered}
    cache = (result.run_dir / "recovered.json").read_text()
    from slimformer.api import report

    report(result.run_dir)  # reuses recovered.json: no retraining, same records
    assert (result.run_dir / "recovered.json").read_text() == cache
