"""Every bad input to every command is a clean refusal: exit code 2, exactly one stderr line `error: ...` naming
the file or field, no traceback, and the file system (the test's directory, the working directory and the shared
model/run fixtures) unchanged. Plus: storage passwords never reach a file or an output line, and a YAML alias bomb
is refused in well under a second without expanding.

Cases run in-process (tests/helpers.py `invoke`) on a tiny random BERT; the ones that get as far as loading the
model load only that. Click's own usage errors (a bad option value) print click's usage message and are not
cases here (docs/CLI.md#exit-codes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import invoke, tiny_config, write_config
from helpers import tiny_model_dir as _tiny_model_dir

from slimformer.compression.recipe import ModelRef, Recipe, Rule, SpecModel
from slimformer.search.config import SearchConfig

SECRET = "hunter2-s3cret"
QUERY = "encoder.layer.0.attention.self.query"
PROFILES = Path(__file__).resolve().parent.parent / "slimformer" / "hardware_profiles" / "profiles"


@dataclass(frozen=True)
class Env:
    """Shared, read-only fixtures: a tiny model, a recipe for it, a compressed model, a run directory with an empty
    study, and a text file that is not UTF-8."""

    base: Path
    model: Path
    recipe: Path
    compressed: Path
    run: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    from slimformer.api import apply_recipe

    base = tmp_path_factory.mktemp("bad-input-shared")
    model = _tiny_model_dir(tmp_path_factory)
    recipe = base / "recipe.yaml"
    Recipe(model=ModelRef(id="tiny"), rules=[Rule(match=QUERY, spec=SpecModel(bits=8))]).save(recipe)
    compressed = apply_recipe(recipe, str(model), out_dir=base / "compressed", samples=8).out_dir
    assert compressed is not None
    run = base / "run"
    run.mkdir()
    (run / "config.yaml").write_text(SearchConfig.model_validate(tiny_config(model, run)).to_yaml())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=f"sqlite:///{run / 'study.db'}", study_name="slimformer",
                        directions=["maximize", "minimize", "minimize"])
    return Env(base, model, recipe, compressed, run)


# -- builders --------------------------------------------------------------------------------------------------
def _cfg(e: Env, d: Path, **over: object) -> Path:
    """A tiny search config in `d` with top-level keys replaced (dotted keys set nested values)."""
    cfg = tiny_config(e.model, d / "run")
    for key, value in over.items():
        *parents, last = key.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return write_config(d / "search.yaml", cfg)


def _raw(d: Path, name: str, data: bytes | str) -> Path:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def alias_bomb(levels: int = 9, prefix: str = "") -> str:
    """A ~1 KB YAML document whose aliases expand to 9**levels strings."""
    lines = [f'{prefix}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"{prefix}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _model_copy(e: Env, d: Path, change: Callable[[Path], None]) -> Path:
    m = d / "model"
    shutil.copytree(e.model, m)
    change(m)
    return m


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _st_dir(e: Env, d: Path, modules: str) -> Path:
    """A sentence-transformers layout of the tiny model with the given modules.json text."""
    return _model_copy(e, d, lambda m: (m / "modules.json").write_text(modules))


def _compressed_copy(e: Env, d: Path, change: Callable[[Path], None]) -> Path:
    c = d / "compressed"
    shutil.copytree(e.compressed, c)
    change(c)
    return c


def _run_copy(e: Env, d: Path, change: Callable[[Path], None]) -> Path:
    r = d / "run-copy"
    shutil.copytree(e.run, r)
    change(r)
    return r


def _recipe(d: Path, doc: dict | str) -> Path:
    base = {"slimformer_recipe": 1, "model": {"id": "tiny"}, "rules": [{"match": QUERY, "spec": {"bits": 8}}]}
    if isinstance(doc, dict):
        base.update(doc)
        return _raw(d, "recipe.yaml", yaml.safe_dump(base, sort_keys=False))
    return _raw(d, "recipe.yaml", doc)


def _blocker(d: Path) -> Path:
    """A file where a directory would have to be: every output path under it is unwritable."""
    return _raw(d, "blocker", "a file\n")


NOT_UTF8 = b"model: caf\xe9\n"
S = ("search", "--no-progress")
Case = Callable[[Env, Path], tuple[list[object], tuple[str, ...]]]

CASES: dict[str, Case] = {
    # ------------------------------------------------------------------------------------ search: the config
    "search-config-missing": lambda e, d: ([*S, d / "nope.yaml"], ("nope.yaml", "does not exist")),
    "search-config-not-utf8": lambda e, d: ([*S, _raw(d, "c.yaml", NOT_UTF8)], ("c.yaml", "not UTF-8")),
    "search-config-latin1-comment": lambda e, d: (
        [*S, _raw(d, "c.yaml", b"# r\xe9sum\xe9\n" + _cfg(e, d).read_bytes())], ("not UTF-8",)),
    "search-config-not-yaml": lambda e, d: ([*S, _raw(d, "c.yaml", "model: [unclosed\n")], ("not valid YAML",)),
    "search-config-a-list": lambda e, d: ([*S, _raw(d, "c.yaml", "- a\n- b\n")], ("YAML mapping",)),
    "search-config-empty": lambda e, d: ([*S, _raw(d, "c.yaml", "")], ("YAML mapping",)),
    "search-config-alias-bomb": lambda e, d: ([*S, _raw(d, "c.yaml", alias_bomb())], ("aliases",)),
    "search-config-merge-key": lambda e, d: (
        [*S, _raw(d, "c.yaml", "base: &b {trials: 3}\nother:\n  <<: *b\n")], ("aliases",)),
    "search-config-over-1mb": lambda e, d: (
        [*S, _raw(d, "c.yaml", "# " + "x" * 1_100_000 + "\n")], ("over 1 MB",)),
    "search-config-binary": lambda e, d: ([*S, _raw(d, "c.yaml", bytes(range(256)))], ("c.yaml",)),
    "search-unknown-key": lambda e, d: ([*S, _cfg(e, d, trails=3)], ("trails", "unknown key")),
    "search-threads-overflow": lambda e, d: ([*S, _cfg(e, d, threads=10**20)], ("threads",)),
    "search-threads-zero": lambda e, d: ([*S, _cfg(e, d, threads=0)], ("threads",)),
    "search-trials-huge": lambda e, d: ([*S, _cfg(e, d, trials=10**30)], ("trials",)),
    "search-timeout-inf": lambda e, d: ([*S, _raw(d, "c.yaml", _cfg(e, d).read_text() + "timeout: .inf\n")],
                                        ("timeout",)),
    "search-timeout-nan": lambda e, d: ([*S, _raw(d, "c.yaml", _cfg(e, d).read_text() + "timeout: .nan\n")],
                                        ("timeout",)),
    "search-batch-size-huge": lambda e, d: ([*S, _cfg(e, d, data__batch_size=10**12)], ("data.batch_size",)),
    "search-max-length-huge": lambda e, d: ([*S, _cfg(e, d, data__max_length=10**9)], ("data.max_length",)),
    "search-seed-negative": lambda e, d: ([*S, _cfg(e, d, data__seed=-1)], ("data.seed",)),
    "search-seed-huge": lambda e, d: ([*S, _cfg(e, d, data__seed=10**30)], ("data.seed",)),
    "search-population-huge": lambda e, d: ([*S, _cfg(e, d, sampler={"population_size": 10**12})],
                                            ("sampler.population_size",)),
    "search-latency-threads-huge": lambda e, d: ([*S, _cfg(e, d, latency={"threads": 10**20})],
                                                 ("latency.threads",)),
    "search-latency-seq-huge": lambda e, d: ([*S, _cfg(e, d, latency={"seq": 10**9})], ("latency.seq",)),
    "search-budget-words": lambda e, d: ([*S, _cfg(e, d, budget={"memory": "lots"})], ("budget.memory",)),
    "search-budget-negative": lambda e, d: ([*S, _cfg(e, d, budget={"memory": -5})], ("budget.memory",)),
    "search-objectives-no-quality": lambda e, d: ([*S, _cfg(e, d, objectives=["latency"])], ("objectives",)),
    "search-space-empty": lambda e, d: ([*S, _cfg(e, d, space={"groups": []})], ("space.groups",)),
    "search-space-bits-3": lambda e, d: (
        [*S, _cfg(e, d, space={"groups": [{"select": {"role": ["query"]}, "bits": [3]}]})], ("bits",)),
    "search-space-layer-range-huge": lambda e, d: (
        [*S, _cfg(e, d, space={"groups": [{"select": {"layers": "0-99999999999"}, "bits": [8]}]})], ("layers",)),
    "search-space-group-size-huge": lambda e, d: (
        [*S, _cfg(e, d, space={"groups": [{"bits": [4], "group_size": [2**70]}]})], ("group_size",)),
    "search-space-cycle-huge": lambda e, d: (
        [*S, _cfg(e, d, space={"groups": [{"bits": [8]}], "sharing": ["cycle" + "9" * 30]})], ("sharing",)),
    "search-space-heads-zero": lambda e, d: (
        [*S, _cfg(e, d, space={"groups": [{"bits": [8], "heads_kept": [0]}]})], ("heads_kept",)),
    "search-recover-batch-huge": lambda e, d: ([*S, _cfg(e, d, recover={"batch_size": 10**12})],
                                               ("recover.batch_size",)),
    "search-recover-minutes-inf": lambda e, d: (
        [*S, _raw(d, "c.yaml", _cfg(e, d).read_text() + "recover: {minutes: .inf}\n")], ("recover.minutes",)),
    "search-profile-missing": lambda e, d: ([*S, _cfg(e, d, hardware_profile=str(d / "p.yaml"))], ("p.yaml",)),
    "search-profile-not-utf8": lambda e, d: (
        [*S, _cfg(e, d, hardware_profile=str(_raw(d, "p.yaml", NOT_UTF8)))], ("p.yaml", "not UTF-8")),
    "search-profile-alias": lambda e, d: (
        [*S, _cfg(e, d, hardware_profile=str(_raw(d, "p.yaml", alias_bomb(3))))], ("aliases",)),
    # ------------------------------------------------------------------------------- search: model and data
    "search-model-missing": lambda e, d: ([*S, _cfg(e, d, model=str(d / "none"))], ("does not exist",)),
    "search-model-no-weights": lambda e, d: (
        [*S, _cfg(e, d, model=str(_model_copy(e, d, lambda m: (m / "model.safetensors").unlink())))],
        ("cannot load the model",)),
    "search-model-truncated": lambda e, d: (
        [*S, _cfg(e, d, model=str(_model_copy(e, d, lambda m: _truncate(m / "model.safetensors"))))],
        ("cannot load the model",)),
    "search-model-config-not-json": lambda e, d: (
        [*S, _cfg(e, d, model=str(_model_copy(e, d, lambda m: (m / "config.json").write_text("{oops"))))],
        ("config.json", "invalid JSON")),
    "search-model-config-not-utf8": lambda e, d: (
        [*S, _cfg(e, d, model=str(_model_copy(e, d, lambda m: (m / "config.json").write_bytes(b'{"a": "\xff"}'))))],
        ("config.json", "not UTF-8")),
    "search-model-config-a-list": lambda e, d: (
        [*S, _cfg(e, d, model=str(_model_copy(e, d, lambda m: (m / "config.json").write_text("[1]"))))],
        ("JSON object",)),
    "search-modules-json-not-json": lambda e, d: (
        [*S, _cfg(e, d, model=str(_st_dir(e, d, "not json")))], ("modules.json", "invalid JSON")),
    "search-modules-json-not-list": lambda e, d: (
        [*S, _cfg(e, d, model=str(_st_dir(e, d, '{"a": 1}')))], ("modules.json", "JSON list")),
    "search-data-txt-not-utf8": lambda e, d: (
        [*S, _cfg(e, d, data={"source": str(_raw(d, "t.txt", b"caf\xe9\n" * 40))})], ("t.txt", "not UTF-8")),
    "search-data-jsonl-bad-line": lambda e, d: (
        [*S, _cfg(e, d, data={"source": str(_raw(d, "t.jsonl", '{"text": "a"}\n{oops\n'))})], ("t.jsonl:2",)),
    "search-data-missing": lambda e, d: ([*S, _cfg(e, d, data={"source": str(d / "none.txt")})],
                                         ("none.txt", "does not exist")),
    "search-data-bad-extension": lambda e, d: (
        [*S, _cfg(e, d, data={"source": str(_raw(d, "t.csv", "a\n"))})], ("unsupported extension",)),
    # ------------------------------------------------------------------------------ search: storage, run dir
    "search-storage-sqlite-missing-model": lambda e, d: (
        [*S, _cfg(e, d, model=str(d / "none")), "--storage", "sqlite:///st.db"], ("does not exist",)),
    "search-storage-journal-missing-model": lambda e, d: (
        [*S, _cfg(e, d, model=str(d / "none")), "--storage", "journal:j.log"], ("does not exist",)),
    "search-storage-sqlite-no-dir": lambda e, d: (
        [*S, _cfg(e, d), "--storage", f"sqlite:///{d}/no/st.db"], ("does not exist",)),
    "search-storage-journal-no-dir": lambda e, d: (
        [*S, _cfg(e, d), "--storage", f"journal:{d}/no/j.log"], ("does not exist",)),
    "search-storage-not-a-url": lambda e, d: ([*S, _cfg(e, d), "--storage", "study.db"], ("not a storage URL",)),
    "search-storage-unknown-scheme": lambda e, d: ([*S, _cfg(e, d), "--storage", "foo://x/y"], ("foo://",)),
    "search-storage-password-no-driver": lambda e, d: (
        [*S, _cfg(e, d), "--storage", f"mysql+nodriver://slim:{SECRET}@127.0.0.1:1/db"], ("slim:***@",)),
    "search-run-dir-under-a-file": lambda e, d: ([*S, _cfg(e, d), "--run-dir", _blocker(d) / "run"],
                                                 ("--run-dir",)),
    # ---------------------------------------------------------------------------------------------- apply
    "apply-recipe-missing": lambda e, d: (["apply", d / "r.yaml", "--model", e.model], ("does not exist",)),
    "apply-recipe-not-utf8": lambda e, d: (["apply", _raw(d, "r.yaml", NOT_UTF8), "--model", e.model],
                                           ("recipe file", "not UTF-8")),
    "apply-recipe-a-directory-name": lambda e, d: (["apply", d / "cwd" / "none.yaml", "--model", e.model],
                                                   ("does not exist",)),
    "apply-recipe-over-1mb": lambda e, d: (["apply", _raw(d, "r.yaml", "#" * 1_000_001), "--model", e.model],
                                           ("over 1 MB",)),
    "apply-recipe-bytes-not-utf8": lambda e, d: (["apply", _raw(d, "r.yaml", b"\xff\xfe"), "--model", e.model],
                                                 ("not UTF-8",)),
    "apply-recipe-alias-bomb": lambda e, d: (
        ["apply", _recipe(d, "slimformer_recipe: 1\nmodel: {id: tiny}\nprovenance:\n" + alias_bomb(9, "  ")),
         "--model", e.model, "--out", d / "out"], ("aliases",)),
    "apply-recipe-provenance-unknown-key": lambda e, d: (
        ["apply", _recipe(d, {"provenance": {"note": "x"}}), "--model", e.model], ("provenance.note", "unknown key")),
    "apply-recipe-provenance-metric-text": lambda e, d: (
        ["apply", _recipe(d, {"provenance": {"metrics": {"cosine": "high"}}}), "--model", e.model],
        ("provenance.metrics",)),
    "apply-recipe-version-3": lambda e, d: (["apply", _recipe(d, {"slimformer_recipe": 3}), "--model", e.model],
                                            ("recipe version 3 is newer than this slimformer reads",)),
    "apply-recipe-bits-5": lambda e, d: (
        ["apply", _recipe(d, {"rules": [{"match": QUERY, "spec": {"bits": 5}}]}), "--model", e.model],
        ("rules.0.spec.bits",)),
    "apply-recipe-method-unknown": lambda e, d: (
        ["apply", _recipe(d, {"rules": [{"match": QUERY, "spec": {"bits": 4, "method": "adaround"}}]}), "--model",
         e.model], ("rules.0.spec.method",)),
    "apply-recipe-bad-regex": lambda e, d: (
        ["apply", _recipe(d, {"rules": [{"match": "re:(", "spec": {"bits": 8}}]}), "--model", e.model],
        ("invalid regex",)),
    "apply-recipe-layer-out-of-range": lambda e, d: (
        ["apply", _recipe(d, {"layers": [{"layer": 99, "heads_kept": 1}]}), "--model", e.model], ("99",)),
    "apply-recipe-layer-huge": lambda e, d: (
        ["apply", _recipe(d, {"layers": [{"layer": 10**30, "heads_kept": 1}]}), "--model", e.model], ("layer",)),
    "apply-recipe-rank-huge": lambda e, d: (
        ["apply", _recipe(d, {"rules": [{"match": QUERY, "spec": {"rank": 2**70}}]}), "--model", e.model],
        ("rank",)),
    "apply-recipe-group-size-huge": lambda e, d: (
        ["apply", _recipe(d, {"rules": [{"match": QUERY, "spec": {"bits": 4, "group_size": 2**70}}]}),
         "--model", e.model], ("group_size",)),
    "apply-recipe-sparsity-nan": lambda e, d: (
        ["apply", _recipe(d, "slimformer_recipe: 1\nmodel: {id: tiny}\nrules:\n- match: " + QUERY +
                          "\n  spec: {sparsity: .nan}\n"), "--model", e.model], ("sparsity",)),
    "apply-recipe-neurons-huge": lambda e, d: (
        ["apply", _recipe(d, {"layers": [{"layer": 0, "neurons_kept": 2**70}]}), "--model", e.model],
        ("neurons_kept",)),
    "apply-recipe-sharing-huge-layer": lambda e, d: (
        ["apply", _recipe(d, {"sharing": {"groups": [[0, 2**70]], "scope": "ffn"}}), "--model", e.model],
        ("recipe",)),
    "apply-out-under-a-file": lambda e, d: (["apply", e.recipe, "--model", e.model, "--out", _blocker(d) / "o"],
                                            ("--out",)),
    "apply-out-foreign-dir": lambda e, d: (
        ["apply", e.recipe, "--model", e.model, "--out", _raw(d, "o/keep.txt", "x").parent], ("not a slimformer",)),
    "apply-onnx-without-out": lambda e, d: (["apply", e.recipe, "--model", e.model, "--onnx"], ("--onnx needs",)),
    "apply-steps-without-recover": lambda e, d: (["apply", e.recipe, "--model", e.model, "--steps", 3],
                                                 ("add --recover",)),
    "apply-recover-data-not-utf8": lambda e, d: (
        ["apply", e.recipe, "--model", e.model, "--recover", "--steps", 1, "--recover-data",
         _raw(d, "t.txt", b"\xff" * 64), "--samples", 4], ("not UTF-8",)),
    "apply-data-not-utf8": lambda e, d: (
        ["apply", e.recipe, "--model", e.model, "--data", _raw(d, "t.txt", b"\xff" * 64), "--samples", 4],
        ("not UTF-8",)),
    "apply-model-truncated": lambda e, d: (
        ["apply", e.recipe, "--model", _model_copy(e, d, lambda m: _truncate(m / "model.safetensors"))],
        ("cannot load the model",)),
    # ------------------------------------------------------------------------------ export-recipe, report
    "export-recipe-not-a-run": lambda e, d: (["export-recipe", d, "--trial", 0], ("not a slimformer run",)),
    "export-recipe-config-not-utf8": lambda e, d: (
        ["export-recipe", _run_copy(e, d, lambda r: (r / "config.yaml").write_bytes(NOT_UTF8)), "--trial", 0],
        ("not UTF-8",)),
    "export-recipe-no-study": lambda e, d: (
        ["export-recipe", _run_copy(e, d, lambda r: (r / "study.db").unlink()), "--trial", 0], ("no study.db",)),
    "export-recipe-trial-missing": lambda e, d: (["export-recipe", e.run, "--trial", 5], ("trial 5",)),
    "export-recipe-out-under-a-file": lambda e, d: (
        ["export-recipe", e.run, "--trial", 0, "--out", _blocker(d) / "r.yaml"], ("--out",)),
    "report-not-a-run": lambda e, d: (["report", d], ("not a slimformer run",)),
    "report-config-not-yaml": lambda e, d: (
        ["report", _run_copy(e, d, lambda r: (r / "config.yaml").write_text("model: [\n"))], ("not valid YAML",)),
    "report-config-alias": lambda e, d: (
        ["report", _run_copy(e, d, lambda r: (r / "config.yaml").write_text(alias_bomb(4)))], ("aliases",)),
    "report-masked-storage-unreachable": lambda e, d: (
        ["report", _run_copy(e, d, lambda r: (r / "config.yaml").write_text(
            (r / "config.yaml").read_text() + "storage: foo+bar://u:***@127.0.0.1:1/db\n"))], ("u:***@",)),
    # ------------------------------------------------------------------------------------------- inspect
    "inspect-missing": lambda e, d: (["inspect", d / "none"], ("does not exist",)),
    "inspect-model-is-a-file": lambda e, d: (["inspect", _raw(d, "m.bin", "x")], ("is a file",)),
    "inspect-no-config": lambda e, d: (["inspect", _raw(d, "m/x.txt", "").parent], ("no config.json",)),
    "inspect-no-weights": lambda e, d: (["inspect", _model_copy(e, d, lambda m: (m / "model.safetensors").unlink())],
                                        ("cannot load the model",)),
    "inspect-weights-garbage": lambda e, d: (
        ["inspect", _model_copy(e, d, lambda m: (m / "model.safetensors").write_bytes(b"\x00" * 100))],
        ("cannot load the model",)),
    "inspect-modules-json-not-json": lambda e, d: (["inspect", _st_dir(e, d, "[{")], ("modules.json",)),
    "inspect-compressed-meta-not-json": lambda e, d: (
        ["inspect", _compressed_copy(e, d, lambda c: (c / "slimformer_model.json").write_text("{"))],
        ("slimformer_model.json",)),
    "inspect-compressed-recipe-alias": lambda e, d: (
        ["inspect", _compressed_copy(e, d, lambda c: (c / "slimformer.yaml").write_text(alias_bomb(3)))],
        ("aliases",)),
    # --------------------------------------------------------------------------------------- bench, export
    "bench-onnx-garbage": lambda e, d: (["bench", _raw(d, "m.onnx", b"\x08garbage" * 50), "--model", e.model],
                                        ("not a readable ONNX model",)),
    "bench-onnx-empty": lambda e, d: (["bench", _raw(d, "m.onnx", b""), "--model", e.model],
                                      ("not a readable ONNX model",)),
    "bench-onnx-only-a-version": lambda e, d: (["bench", _raw(d, "m.onnx", b"\x08\x07"), "--model", e.model],
                                               ("not a readable ONNX model",)),
    "bench-onnx-without-model": lambda e, d: (["bench", _raw(d, "m.onnx", b"x")], ("needs --model",)),
    "bench-onnx-missing": lambda e, d: (["bench", d / "m.onnx", "--model", e.model], ("does not exist",)),
    "bench-recipe-without-model": lambda e, d: (["bench", e.recipe], ("needs --model",)),
    "bench-json-under-a-file": lambda e, d: (
        ["bench", e.recipe, "--model", e.model, "--json", _blocker(d) / "r.json"], ("--json",)),
    "bench-dir-not-compressed": lambda e, d: (["bench", d, "--model", e.model], ("not a compressed",)),
    "export-not-compressed": lambda e, d: (["export", d], ("not a compressed",)),
    "export-out-under-a-file": lambda e, d: (["export", e.compressed, "--out", _blocker(d) / "m.onnx"], ("--out",)),
    "export-weights-truncated": lambda e, d: (
        ["export", _compressed_copy(e, d, lambda c: _truncate(c / "slimformer.safetensors"))],
        ("cannot load the model",)),
    # ----------------------------------------------------------------------------------- calibrate, profile
    "calibrate-out-under-a-file": lambda e, d: (["calibrate", "--quick", "--out", _blocker(d) / "p.yaml"],
                                                ("--out",)),
    "calibrate-refit-missing-profile": lambda e, d: (
        ["calibrate", "--refit-residual", str(d / "p.yaml"), "--out", d / "q.yaml"], ("p.yaml",)),
    "profile-show-missing": lambda e, d: (["profile", "show", str(d / "p.yaml")], ("does not exist",)),
    "profile-show-not-yaml": lambda e, d: (["profile", "show", str(_raw(d, "p.yaml", "a: [\n"))], ("not valid YAML",)),
    "profile-show-not-utf8": lambda e, d: (["profile", "show", str(_raw(d, "p.yaml", NOT_UTF8))], ("not UTF-8",)),
    "profile-show-unknown-key": lambda e, d: (["profile", "show", str(_raw(d, "p.yaml", "nme: x\n"))], ("nme",)),
    "profile-validate-missing": lambda e, d: (["profile", "validate", str(d / "p.yaml"), "--model", e.model],
                                              ("does not exist",)),
    "profile-validate-alias": lambda e, d: (["profile", "validate", str(_raw(d, "p.yaml", alias_bomb(3))),
                                             "--model", e.model], ("aliases",)),
    "profile-validate-write-outside-repo": lambda e, d: (
        ["profile", "validate", str(PROFILES / "amd-epyc-avx512-1t-ort1-32.yaml"), "--model", e.model, "--write"],
        ("BENCHMARKS.md",)),
    "profile-validate-uncalibrated": lambda e, d: (
        ["profile", "validate", "amd-epyc-avx512-2t-torch", "--model", e.model], ("no calibrated latency model",)),
}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `roots` with its size and modification time."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.stat()
            out[str(p)] = (0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return out


def one_error_line(stderr: str, *needles: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_there_are_at_least_60_cases_over_every_command() -> None:
    assert len(CASES) >= 60
    prefixes = {name.split("-")[0] for name in CASES}
    assert prefixes >= {"search", "apply", "export", "report", "inspect", "bench", "calibrate", "profile"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name: str, env: Env, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    args, needles = CASES[name](env, tmp_path)
    watched = (tmp_path, env.base, PROFILES)
    before = snapshot(*watched)
    t0 = time.perf_counter()
    res = invoke(*args)
    assert res.exit_code == 2, (name, res.stdout, res.stderr)
    line = one_error_line(res.stderr, *needles)
    assert SECRET not in line and SECRET not in res.stdout
    assert res.stdout == ""
    assert snapshot(*watched) == before, name
    assert time.perf_counter() - t0 < 60, name


# -- secrets ---------------------------------------------------------------------------------------------------
def test_passwords_are_masked_and_restored_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimformer.search.storage import hide_password, with_password

    for url, shown in [(f"postgresql+psycopg2://slim:{SECRET}@db:5432/s", "postgresql+psycopg2://slim:***@db:5432/s"),
                       ("postgresql://u:p@ss:w@rd@h/db", "postgresql://u:***@h/db"),  # unescaped specials
                       ("mysql://root:x@localhost/x?charset=utf8", "mysql://root:***@localhost/x?charset=utf8"),
                       ("postgresql://slim@db/s", "postgresql://slim@db/s"),
                       ("sqlite:////abs/study.db", "sqlite:////abs/study.db"), ("journal:/j.log", "journal:/j.log")]:
        assert hide_password(url) == shown
    monkeypatch.delenv("SLIMFORMER_STORAGE_PASSWORD", raising=False)
    assert with_password("postgresql://slim:***@db/s") == "postgresql://slim@db/s"  # libpq: PGPASSWORD, .pgpass
    monkeypatch.setenv("SLIMFORMER_STORAGE_PASSWORD", "p/w@1")
    assert with_password("postgresql://slim:***@db/s") == "postgresql://slim:p%2Fw%401@db/s"
    assert with_password(f"postgresql://slim:{SECRET}@db/s") == f"postgresql://slim:{SECRET}@db/s"


def test_no_written_document_keeps_a_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://slim:{SECRET}@db.internal:5432/studies"
    cfg = SearchConfig.model_validate(tiny_config("m", tmp_path / "run", storage=url))
    assert SECRET not in cfg.to_yaml() and "slim:***@db.internal" in cfg.to_yaml()
    rec = Recipe(model=ModelRef(id="m"), provenance={"study": "s", "storage": url, "trial": 1})
    assert SECRET not in rec.to_yaml() and rec.provenance.storage == hide(url)


def hide(url: str) -> str:
    from slimformer.search.storage import hide_password

    return hide_password(url)


def test_unreachable_database_with_a_password_fails_cleanly_and_hides_it(env: Env, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage is opened after the config, model and data validated (nothing written before); a server that
    is not there is one line, password masked, and nothing is written."""
    pytest.importorskip("psycopg2")
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(env, tmp_path)
    before = snapshot(tmp_path, env.base)
    res = invoke("search", cfg, "--no-progress", "--storage", f"postgresql+psycopg2://slim:{SECRET}@127.0.0.1:1/s")
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("[slimformer] ")]
    assert len(lines) == 1 and lines[0].startswith("error: storage postgresql+psycopg2://slim:***@127.0.0.1:1/s")
    assert SECRET not in res.stderr + res.stdout
    assert snapshot(tmp_path, env.base) == before


PG_URL = os.environ.get("SLIMFORMER_TEST_PG_URL")


def _pg_url_with_password() -> tuple[str, str]:
    """SLIMFORMER_TEST_PG_URL with a password in it: its own, or SECRET where the server ignores it (the CI
    server's trust authentication); skips without a server."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    if not PG_URL:
        pytest.skip("SLIMFORMER_TEST_PG_URL is not set: `export SLIMFORMER_TEST_PG_URL=$(bash scripts/ci-services.sh)`")
    url = make_url(PG_URL)
    if url.password:
        return PG_URL, str(url.password)
    with_secret = url._replace(password=SECRET).render_as_string(hide_password=False)
    try:
        engine = create_engine(with_secret)
        engine.connect().close()
        engine.dispose()
    except Exception:
        pytest.skip("the test server neither has a password in SLIMFORMER_TEST_PG_URL nor ignores one")
    return with_secret, SECRET


def test_a_real_search_with_a_password_writes_it_nowhere(env: Env, tmp_path: Path, capfd: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: search, export-recipe and report with a password in the URL; no file under the run directory, no
    recipe and no output line holds it, and report reads the masked config.yaml with the password from the env."""
    pg_url, password = _pg_url_with_password()
    name = f"bad-input-{os.getpid()}-{time.time_ns()}"
    cfg = _cfg(env, tmp_path, trials=2, baselines=False, study_name=name)
    outs = [invoke("search", cfg, "--no-progress", "--storage", pg_url)]
    assert outs[0].exit_code == 0, outs[0].stderr
    run = tmp_path / "run"
    assert ":***@" in (run / "config.yaml").read_text()
    monkeypatch.setenv("SLIMFORMER_STORAGE_PASSWORD", password)
    outs.append(invoke("report", run))
    assert outs[1].exit_code == 0, outs[1].stderr
    front = json.loads((run / "pareto.json").read_text())["trials"]
    if front:
        outs.append(invoke("export-recipe", run, "--trial", front[0]["trial"]))
        assert outs[-1].exit_code == 0
    for out in outs:
        assert password not in out.stdout + out.stderr
    assert password not in capfd.readouterr().err
    for f in run.rglob("*"):
        if f.is_file():
            assert password.encode() not in f.read_bytes(), f


# -- bounded input ---------------------------------------------------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_fast_without_expanding(tmp_path: Path) -> None:
    from slimformer.errors import RecipeError

    text = "slimformer_recipe: 1\nmodel: {id: tiny}\nprovenance:\n" + alias_bomb(12, "  ")
    path = _raw(tmp_path, "bomb.yaml", text)
    assert len(text) < 4096  # a 4 KB document that would expand to 9**12 strings
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases"):
        Recipe.load(path)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 50 * 2**20, (seconds, peak)


def test_every_recipe_slimformer_wrote_still_loads(tmp_path: Path) -> None:
    """The typed provenance reads the keys a search writes (docs/RECIPES.md's example) and a hand-written `{}`."""
    doc = Path(__file__).resolve().parent.parent / "docs" / "RECIPES.md"
    text = doc.read_text()
    block = text[text.index("provenance:\n  study:"):]
    block = block[: block.index("```")]
    rec = Recipe.from_yaml("slimformer_recipe: 1\nmodel: {id: m}\n" + block)
    assert rec.provenance.trial == 0 and rec.provenance.metrics["memory_bytes"] == 13477104
    assert isinstance(rec.provenance.metrics["memory_bytes"], int)
    assert Recipe.from_yaml(rec.to_yaml()) == rec
    empty = Recipe.from_yaml("slimformer_recipe: 1\nmodel: {id: m}\nprovenance: {}\n")
    assert Recipe.from_yaml(empty.to_yaml()) == empty  # an empty provenance is left out (the reader's default)


def test_option_bounds_agree_with_the_config_bounds() -> None:
    from slimformer import cli_errors, threads
    from slimformer.search import config

    assert cli_errors.MAX_THREADS == threads.MAX_THREADS
    assert cli_errors.MAX_TRIALS == config.MAX_TRIALS and cli_errors.MAX_SAMPLES == config.MAX_SAMPLES


def test_sha256_mismatch_is_one_clean_warning_line(env: Env, tmp_path: Path) -> None:
    rec = Recipe.load(env.recipe).model_copy(update={"model": ModelRef(id="tiny", sha256="0" * 64)})
    rec.save(tmp_path / "r.yaml")
    res = invoke("apply", tmp_path / "r.yaml", "--model", env.model, "--samples", 4)
    assert res.exit_code == 0, res.stderr
    warn = [ln for ln in res.stderr.splitlines() if "recipe was made for weights" in ln]
    assert warn == [ln for ln in res.stderr.splitlines() if "arning" in ln]
    assert len(warn) == 1 and warn[0].startswith("warning: ") and "UserWarning" not in res.stderr


def test_report_and_export_recipe_do_not_print_optuna_lines(env: Env, tmp_path: Path) -> None:
    res = invoke("export-recipe", env.run, "--trial", 0)
    assert "Using an existing study" not in res.stderr


def test_profile_validate_writes_nothing_by_default() -> None:
    from click.testing import CliRunner

    from slimformer.cli import main

    res = CliRunner().invoke(main, ["profile", "validate", "--help"])
    assert "--write" in res.output and "--no-write" not in res.output
