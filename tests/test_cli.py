"""The `slimformer` command line: help, exit code 2 with one `error:` line on bad input, and the commands."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import invoke, tiny_config, write_config
from helpers import shared_run as _shared_run
from helpers import tiny_model_dir as _tiny_model_dir
from safetensors.torch import load_file

from slimformer.compression.recipe import Recipe
from slimformer.compression.saving import load_any
from slimformer.models import load

COMMANDS = ("search", "apply", "export-recipe", "report", "inspect")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory):
    return _shared_run(tmp_path_factory)


def stderr_of(result) -> str:
    try:
        return result.stderr
    except ValueError:  # pragma: no cover - click < 8.2 without mix_stderr=False
        return result.output


def assert_one_error_line(stderr: str, *needles: str, only_line: bool = True) -> str:
    """Exactly one `error:` line naming the problem, and no traceback.

    With only_line, stderr is that single line; otherwise the other lines are `[slimformer]` progress logs
    printed before the error was found (e.g. "loading model ...").
    """
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert lines[-1] == errors[0], stderr
    if only_line:
        assert lines == errors, stderr
    else:
        assert all(ln.startswith("[slimformer] ") for ln in lines[:-1]), stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -------------------------------------------------------------------------------------------- help


def test_top_level_help_lists_every_command() -> None:
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help_exits_0(cmd: str) -> None:
    res = invoke(cmd, "--help")
    assert res.exit_code == 0, stderr_of(res)
    assert res.stdout.startswith("Usage:")
    assert cmd in res.stdout.splitlines()[0]


def test_console_script_help() -> None:
    exe = shutil.which("slimformer")
    assert exe, "the slimformer console script is installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(cmd in out.stdout for cmd in COMMANDS)


# ------------------------------------------------------------------------------------- bad input


def _search_case(tmp_path: Path, model: Path, case: str) -> tuple[list[object], tuple[str, ...], bool]:
    """(search args, needles in the error line, whether stderr is only the error line)."""
    cfg = tiny_config(model, tmp_path / "cfg-run")
    only = True
    if case == "unknown-key":
        cfg["space"]["groups"][1]["select"]["rol"] = ["query"]
        needles: tuple[str, ...] = ("space.groups.1.select.rol", "unknown key")
    elif case == "unknown-top-key":
        cfg["trails"] = 8
        needles = ("trails", "unknown key")
    elif case == "wrong-type":
        cfg["trials"] = "eight"
        needles = ("trials", "integer")
    elif case == "missing-model":
        cfg["model"] = str(tmp_path / "no-such-model")
        needles, only = (str(tmp_path / "no-such-model"), "does not exist"), False
    elif case == "impossible-budget":
        cfg["budget"] = {"memory": "1%"}
        needles, only = ("budget.memory", "smallest plan"), False
    elif case == "bad-budget-string":
        cfg["budget"] = {"memory": "15 potatoes"}
        needles, only = ("budget.memory", "15 potatoes"), False
    elif case == "bad-latency-budget":
        cfg["budget"] = {"memory": "40%", "latency": "0x"}
        needles = ("budget.latency", "'0x'", "'8ms'", "'0.5x'")
    elif case == "unknown-latency-unit":
        cfg["budget"] = {"memory": "40%", "latency": "8min"}
        needles = ("budget.latency", "'8min'", "'8ms'", "'0.5x'")
    elif case == "impossible-latency-budget":
        cfg["budget"] = {"memory": "40%", "latency": "0.1x"}
        needles = ("budget.latency 0.1x of the fp32 model's", "below the fastest plan of the space (predicted",
                   "at batch 1, seq 128 on profile amd-epyc-avx512-2t-torch")
    elif case == "missing-config":
        return [tmp_path / "missing.yaml"], (str(tmp_path / "missing.yaml"), "does not exist"), True
    else:  # pragma: no cover
        raise AssertionError(case)
    return [write_config(tmp_path / "search.yaml", cfg)], needles, only


@pytest.mark.parametrize("case", ["unknown-key", "unknown-top-key", "wrong-type", "missing-model",
                                  "impossible-budget", "bad-budget-string", "missing-config", "bad-latency-budget",
                                  "unknown-latency-unit", "impossible-latency-budget"])
def test_bad_search_input_exits_2_with_one_error_line_and_writes_nothing(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.chdir(tmp_path)
    args, needles, only = _search_case(tmp_path, tiny_model_dir, case)
    before = snapshot(tmp_path)
    res = invoke("search", *args, "--run-dir", tmp_path / "run", "--no-progress")
    assert res.exit_code == 2, (res.stdout, stderr_of(res))
    assert_one_error_line(stderr_of(res), *needles, only_line=only)
    assert res.stdout == ""
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "cfg-run").exists()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["impossible-budget", "impossible-latency-budget", "bad-latency-budget"])
def test_bad_budget_creates_no_shared_storage(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                              case: str) -> None:
    """The budgets are checked before a shared storage is opened: no SQLite file appears."""
    monkeypatch.chdir(tmp_path)
    args, needles, _ = _search_case(tmp_path, tiny_model_dir, case)
    before = snapshot(tmp_path)
    res = invoke("search", *args, "--run-dir", tmp_path / "run", "--storage", f"sqlite:///{tmp_path / 'shared.db'}",
                 "--no-progress")
    assert res.exit_code == 2, (res.stdout, stderr_of(res))
    assert_one_error_line(stderr_of(res), *needles)
    assert not (tmp_path / "shared.db").exists() and snapshot(tmp_path) == before


def _recipe_text(unit: str, extra: dict | None = None) -> str:
    doc = {"slimformer_recipe": 1, "model": {"id": "tiny"}, "rules": [{"match": unit, "spec": {"bits": 8}}]}
    doc.update(extra or {})
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.mark.parametrize(("case", "text", "needles"), [
    ("unit-the-model-lacks", _recipe_text("encoder.layer.7.attention.self.query"),
     ("encoder.layer.7.attention.self.query", "match no unit")),
    ("unknown-key", _recipe_text("encoder.layer.0.attention.self.query", {"rulez": []}),
     ("rulez", "unknown key")),
    ("unknown-spec-key", _recipe_text("encoder.layer.0.attention.self.query").replace("bits: 8", "bitz: 8"),
     ("rules.0.spec.bitz", "unknown key")),
    ("missing-file", None, ("does not exist",)),
])
def test_bad_recipe_exits_2_with_one_error_line_and_writes_nothing(
        tmp_path: Path, tiny_model_dir: Path, case: str, text: str | None, needles: tuple[str, ...]) -> None:
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    before = snapshot(tmp_path)
    res = invoke("apply", recipe, "--model", tiny_model_dir, "--out", tmp_path / "out", "--samples", 8)
    assert res.exit_code == 2, (res.stdout, stderr_of(res))
    assert_one_error_line(stderr_of(res), *needles)
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before


def test_apply_to_a_missing_model_exits_2(tmp_path: Path, shared_run) -> None:
    _, run_dir, _ = shared_run
    recipe = next((run_dir / "recipes").glob("*.yaml"))
    res = invoke("apply", recipe, "--model", tmp_path / "nope", "--out", tmp_path / "out")
    assert res.exit_code == 2
    assert_one_error_line(stderr_of(res), "does not exist")
    assert not (tmp_path / "out").exists()


def test_console_script_bad_config_one_error_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The real process: nothing but the error line on stderr (no warnings, no progress bars)."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "cfg-run")
    cfg["data"]["search_sampels"] = 16
    path = write_config(tmp_path / "search.yaml", cfg)
    out = subprocess.run([shutil.which("slimformer") or "slimformer", "search", str(path), "--run-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert_one_error_line(out.stderr, "data.search_sampels", "unknown key")
    assert out.stdout == ""
    assert not (tmp_path / "run").exists() and not (tmp_path / "cfg-run").exists()


@pytest.mark.parametrize("case", ["missing-model", "impossible-budget", "impossible-latency-budget"])
def test_bad_model_or_budget_stderr_is_only_the_error_line(tmp_path: Path, tiny_model_dir: Path,
                                                            case: str) -> None:
    args, needles, _ = _search_case(tmp_path, tiny_model_dir, case)
    res = invoke("search", *args, "--run-dir", tmp_path / "run", "--no-progress")
    assert res.exit_code == 2
    assert_one_error_line(stderr_of(res), *needles, only_line=True)


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_lists_units_and_breakdown(tiny_model_dir: Path) -> None:
    res = invoke("inspect", tiny_model_dir)
    assert res.exit_code == 0, stderr_of(res)
    out = res.stdout
    adapter = load(str(tiny_model_dir))
    for u in adapter.units:
        assert u.name in out
    assert "2 layers, 4 heads, FFN width 64" in out
    assert "memory breakdown" in out
    for group in ("embeddings", "attention", "ffn", "total"):
        assert group in out


def test_inspect_json_parses(tiny_model_dir: Path) -> None:
    res = invoke("inspect", tiny_model_dir, "--json")
    assert res.exit_code == 0, stderr_of(res)
    doc = json.loads(res.stdout)
    adapter = load(str(tiny_model_dir))
    assert [u["name"] for u in doc["units"]] == adapter.unit_names
    roles = {u["name"]: u["role"] for u in doc["units"]}
    assert roles["embeddings.word_embeddings"] == "embedding"
    assert roles["encoder.layer.1.output.dense"] == "ffn_out"
    assert sum(doc["memory"].values()) == doc["total_bytes"]
    assert doc["total_bytes"] == 4 * sum(p.numel() for p in adapter.model.parameters())


def test_inspect_missing_model_exits_2(tmp_path: Path) -> None:
    res = invoke("inspect", tmp_path / "nope")
    assert res.exit_code == 2
    assert_one_error_line(stderr_of(res), "does not exist")


# ------------------------------------------------------------------------------------ export-recipe


def _front(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "pareto.json").read_text())["trials"]


def test_export_recipe_prints_valid_yaml(shared_run, tiny_model_dir: Path) -> None:
    _, run_dir, _ = shared_run
    n = _front(run_dir)[0]["trial"]
    res = invoke("export-recipe", run_dir, "--trial", n)
    assert res.exit_code == 0, stderr_of(res)
    rec = Recipe.from_yaml(res.stdout)
    saved = Recipe.load(run_dir / "recipes" / f"trial-{n}.yaml")
    assert rec.rules == saved.rules and rec.layers == saved.layers and rec.sharing == saved.sharing
    assert rec.provenance.trial == n
    adapter = load(str(tiny_model_dir))
    assert rec.to_plan(adapter) == saved.to_plan(adapter)


def test_export_recipe_to_file(shared_run, tmp_path: Path) -> None:
    _, run_dir, _ = shared_run
    n = _front(run_dir)[-1]["trial"]
    out = tmp_path / "r.yaml"
    res = invoke("export-recipe", run_dir, "--trial", n, "--out", out)
    assert res.exit_code == 0, stderr_of(res)
    assert Recipe.load(out).provenance.trial == n


@pytest.mark.parametrize("trial", [999, -1])
def test_export_recipe_missing_trial_exits_2(shared_run, tmp_path: Path, trial: int) -> None:
    _, run_dir, _ = shared_run
    res = invoke("export-recipe", run_dir, "--trial", trial, "--out", tmp_path / "r.yaml")
    assert res.exit_code == 2
    assert_one_error_line(stderr_of(res), f"trial {trial}")
    assert not (tmp_path / "r.yaml").exists()


def test_export_recipe_from_a_non_run_directory_exits_2(tmp_path: Path) -> None:
    res = invoke("export-recipe", tmp_path, "--trial", 0)
    assert res.exit_code == 2
    assert_one_error_line(stderr_of(res), "config.yaml")


# ------------------------------------------------------------------------------------------- report


def test_report_rebuilds_a_copied_run(shared_run, tmp_path: Path) -> None:
    _, run_dir, _ = shared_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink()
    (copy / "pareto.json").unlink()
    res = invoke("report", copy)
    assert res.exit_code == 0, stderr_of(res)
    assert (copy / "report.html").is_file()
    assert [e["trial"] for e in _front(copy)] == [e["trial"] for e in _front(run_dir)]


# -------------------------------------------------------------------------------------------- apply


def _most_compressed_recipe(run_dir: Path) -> tuple[Path, dict]:
    entry = min(_front(run_dir), key=lambda e: e["memory_bytes"])
    return run_dir / entry["recipe"], entry


def test_apply_writes_a_loadable_model_and_is_deterministic(shared_run, tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    _, run_dir, _ = shared_run
    recipe, entry = _most_compressed_recipe(run_dir)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    res = invoke("apply", recipe, "--model", tiny_model_dir, "--out", out1, "--samples", 16)
    assert res.exit_code == 0, stderr_of(res)
    assert f"memory: {entry['memory_bytes']:,d} bytes" in res.stdout
    assert "fidelity on 16 held-out samples" in res.stdout
    assert (out1 / "slimformer.safetensors").is_file() and (out1 / "slimformer.yaml").is_file()
    assert Recipe.load(out1 / "slimformer.yaml").rules == Recipe.load(recipe).rules

    loaded = load_any(str(out1))
    assert loaded.unit_names == load(str(tiny_model_dir)).unit_names
    assert loaded.recipe.rules == Recipe.load(recipe).rules  # type: ignore[attr-defined]

    res = invoke("apply", recipe, "--model", tiny_model_dir, "--out", out2, "--samples", 16)
    assert res.exit_code == 0, stderr_of(res)
    a, b = load_file(str(out1 / "slimformer.safetensors")), load_file(str(out2 / "slimformer.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bool((a[k] == b[k]).all()), k

    # Re-applying over an existing slimformer output replaces it with the same tensors.
    res = invoke("apply", recipe, "--model", tiny_model_dir, "--out", out1, "--samples", 16)
    assert res.exit_code == 0, stderr_of(res)
    c = load_file(str(out1 / "slimformer.safetensors"))
    assert c.keys() == a.keys() and all(bool((c[k] == a[k]).all()) for k in a)


def test_apply_refuses_a_foreign_out_dir(shared_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    _, run_dir, _ = shared_run
    recipe, _ = _most_compressed_recipe(run_dir)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = invoke("apply", recipe, "--model", tiny_model_dir, "--out", out, "--samples", 8)
    assert res.exit_code == 2
    assert_one_error_line(stderr_of(res), "not a slimformer output")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
