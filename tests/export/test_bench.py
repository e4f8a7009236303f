"""`slimformer bench` / `apply --onnx` / `export`: fp32 and ORT dynamic-int8 baselines against the target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import invoke

ort = pytest.importorskip("onnxruntime")

from slimformer.export.bench import BASELINES, FP32, INT8_CHANNEL, INT8_TENSOR, TARGET  # noqa: E402

FAST = ("--samples", "16", "--runs", "3", "--warmup", "1", "--seq", "8,16", "--batch", "1,4", "--threads", "1")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_dir) -> Path:
    rules = [{"match": "embeddings.word_embeddings", "spec": {"bits": 4, "group_size": 32}},
             {"match": "re:.*attention.*", "spec": {"bits": 8}},
             {"match": "re:.*(intermediate|output).*", "spec": {"bits": 4, "group_size": 32}}]
    p = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    p.write_text(yaml.safe_dump({"slimformer_recipe": 1, "model": {"id": str(tiny_dir)}, "rules": rules}))
    return p


@pytest.fixture(scope="module")
def applied(tmp_path_factory, tiny_dir, recipe):
    out = tmp_path_factory.mktemp("applied") / "out"
    res = invoke("apply", recipe, "--model", tiny_dir, "--out", out, "--onnx", "--samples", 16)
    assert res.exit_code == 0, res.output
    return out, res.stdout


def test_apply_onnx_writes_a_plain_session_model(applied) -> None:
    out, stdout = applied
    sess = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} >= {"input_ids", "attention_mask"}
    line = next(x for x in stdout.splitlines() if "onnx/model.onnx" in x)
    assert "bytes on disk" in line and "resident weight bytes" in line and "mean cosine" in line
    cos = float(line.split("mean cosine ")[1].split(",")[0])
    assert cos > 0.999


def test_apply_onnx_is_atomic_model_onnx_included(tiny_dir, recipe, tmp_path: Path, monkeypatch) -> None:
    """`apply --out --onnx` writes model.onnx inside the temp dir: a failure (or kill) before the end leaves no
    output directory without its ONNX file, and no temp dir."""
    from slimformer import api

    def broken(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(api, "_export_checked", broken)
    with pytest.raises(RuntimeError, match="export failed"):
        api.apply_recipe(recipe, str(tiny_dir), out_dir=tmp_path / "out", samples=16, onnx=True)
    assert list(tmp_path.iterdir()) == [], "no output directory and no temp dir"
    monkeypatch.undo()
    res = api.apply_recipe(recipe, str(tiny_dir), out_dir=tmp_path / "out", samples=16, onnx=True)
    assert res.onnx is not None and res.onnx.path == tmp_path / "out" / "onnx" / "model.onnx"
    assert res.onnx.path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_command_rewrites_model_onnx(applied, tmp_path: Path) -> None:
    out, _ = applied
    target = tmp_path / "again.onnx"
    res = invoke("export", out, "--out", target)
    assert res.exit_code == 0, res.output
    assert target.stat().st_size == (out / "onnx" / "model.onnx").stat().st_size


def test_export_and_bench_fast_kernels(applied, tmp_path: Path) -> None:
    out, _ = applied
    target = tmp_path / "fast.onnx"
    res = invoke("export", out, "--out", target, "--kernels", "fast")
    assert res.exit_code == 0, res.output
    assert "(fast kernels)" in res.stdout
    ops = {n.op_type for n in __import__("onnx").load(str(target)).graph.node}
    assert "DynamicQuantizeMatMul" in ops and "MatMulNBits" not in ops
    js = tmp_path / "fast.json"
    res = invoke("bench", out, "--kernels", "fast", "--json", js, *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads(js.read_text())["extra"]["kernels"] == "fast" and "kernels: fast" in res.stdout
    bad = invoke("export", out, "--kernels", "turbo")
    assert bad.exit_code == 2 and "turbo" in bad.output


def test_bench_json_has_four_models_with_all_fields(applied, tiny_dir, tmp_path: Path) -> None:
    out, _ = applied
    js = tmp_path / "bench.json"
    res = invoke("bench", out / "onnx" / "model.onnx", "--model", tiny_dir, *FAST, "--json", js)
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    for key in ("threads", "cpu", "onnxruntime", "date", "runs", "batches", "seqs", "target_ratios"):
        assert key in d
    assert d["threads"] == 1 and d["onnxruntime"] == ort.__version__ and d["cpu"]
    models = {m["name"]: m for m in d["models"]}
    assert set(models) == {FP32, INT8_TENSOR, INT8_CHANNEL, TARGET}
    for m in models.values():
        assert m["file_bytes"] > 0 and m["resident_bytes"] > 0
        assert 0.5 < m["fidelity"]["cosine"] <= 1.0 + 1e-6 and "neighbours" in m["fidelity"]
        assert {(x["batch"], x["seq"]) for x in m["latency"]} == {(1, 8), (1, 16), (4, 8), (4, 16)}
        for x in m["latency"]:
            assert x["ms"]["n"] == 3 and x["ms"]["median"] > 0 and x["ms"]["iqr"] >= 0
            assert x["ratio_to_fp32"]["median"] > 0
    assert models[FP32]["fidelity"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    for name in (INT8_TENSOR, INT8_CHANNEL):
        assert models[name]["file_bytes"] < models[FP32]["file_bytes"]
        assert models[name]["resident_bytes"] < models[FP32]["resident_bytes"]
    assert models[TARGET]["resident_bytes"] < models[FP32]["resident_bytes"]
    assert {r["baseline"] for r in d["target_ratios"]} == set(BASELINES)
    assert len(d["target_ratios"]) == 3 * 4
    assert all(r["ratio"]["median"] > 0 and r["ratio"]["q1"] > 0 for r in d["target_ratios"])
    assert "target / baseline" in res.stdout


def test_bench_recipe_and_directory_targets(applied, recipe, tiny_dir) -> None:
    from slimformer.api import bench

    out, _ = applied
    fast = dict(samples=8, runs=1, warmup=0, seqs=(8,), batches=(2,))
    from_dir = bench(out, **fast)  # the model comes from the recipe in the directory
    from_recipe = bench(recipe, str(tiny_dir), **fast)
    for r in (from_dir, from_recipe):
        assert [m.name for m in r.models] == [FP32, INT8_TENSOR, INT8_CHANNEL, TARGET]
        assert r.model_named(TARGET).fidelity["cosine"] > 0.99
    assert from_dir.model_named(TARGET).resident_bytes == from_recipe.model_named(TARGET).resident_bytes


def test_bench_onnx_without_model_exits_2_with_one_line(applied) -> None:
    out, _ = applied
    res = invoke("bench", out / "onnx" / "model.onnx", "--runs", 3)
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--model" in err[0]


def test_apply_onnx_without_out_exits_2(recipe, tiny_dir) -> None:
    res = invoke("apply", recipe, "--model", tiny_dir, "--onnx", "--samples", 8)
    assert res.exit_code == 2
    assert "--onnx needs --out" in res.stderr


def test_apply_kernels_without_onnx_exits_2(recipe, tiny_dir) -> None:
    res = invoke("apply", recipe, "--model", tiny_dir, "--kernels", "fast", "--samples", 8)
    assert res.exit_code == 2
    assert "--kernels fast applies to the ONNX export; add --onnx" in res.stderr


class _CountingSession:
    """A stand-in onnxruntime session that records the order of runs (the timing loop is under test)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def get_inputs(self) -> list:
        return []

    def get_outputs(self) -> list:  # the loop fetches the first (deployed) output only
        from types import SimpleNamespace

        return [SimpleNamespace(name="sentence_embedding")]

    def run(self, _outputs: object, _feed: object) -> None:
        self.log.append(self.name)


@pytest.mark.parametrize("repeat", [1, 3])
def test_round_robin_runs_each_turn_repeat_times_back_to_back(repeat: int) -> None:
    from slimformer.export.bench import time_round_robin

    log: list[str] = []
    sessions = {n: _CountingSession(n, log) for n in ("a", "b")}
    times = time_round_robin(sessions, {}, runs=2, warmup=1, repeat=repeat)  # type: ignore[arg-type]
    assert {n: len(t) for n, t in times.items()} == {"a": 2, "b": 2}  # one timing per turn, the last run
    assert log == ["a", "b"] + ["a"] * repeat + ["b"] * repeat + ["b"] * repeat + ["a"] * repeat


def test_optimized_baseline_is_opt_in_and_fused(applied, tiny_dir, tmp_path: Path) -> None:
    """--optimized-baseline adds ORT's optimised dynamic int8 (eager-attention export fused by the transformers
    optimizer: com.microsoft Attention, then quantised per channel) beside the three unchanged baselines, with its
    own target ratio rows; the default bench has no such model."""
    from slimformer.export.bench import INT8_OPTIMIZED

    out, _ = applied
    res = invoke("bench", out / "onnx" / "model.onnx", "--model", tiny_dir, *FAST, "--optimized-baseline",
                 "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "b.json").read_text())
    models = {m["name"]: m for m in d["models"]}
    assert set(models) == {FP32, INT8_TENSOR, INT8_CHANNEL, INT8_OPTIMIZED, TARGET}
    assert models[INT8_OPTIMIZED]["fidelity"]["cosine"] > 0.9
    assert models[INT8_OPTIMIZED]["resident_bytes"] < models[FP32]["resident_bytes"]
    assert {r["baseline"] for r in d["target_ratios"]} == {*BASELINES, INT8_OPTIMIZED}


def test_optimized_baseline_fuses_attention(tiny_bert, tmp_path: Path) -> None:
    """The optimised baseline's graph has ORT's fused Attention (quantised: QAttention) and no Softmax."""
    import onnx

    from slimformer.export.bench import optimized_int8_dynamic

    ops = {n.op_type for n in onnx.load(str(optimized_int8_dynamic(tiny_bert, tmp_path))).graph.node}
    assert ops & {"Attention", "QAttention"} and "Softmax" not in ops


def test_bench_recover_distils_a_recipe_with_its_recorded_settings(tiny_dir, recipe, tmp_path: Path) -> None:
    """`bench RECIPE --recover` applies the recipe's recorded recovery before timing: the JSON records it and the
    target's fidelity column is the recovered model's."""
    rec = yaml.safe_load(recipe.read_text())
    rec["recovery"] = {"settings": {"steps": 2, "batch_size": 8, "samples": 16, "data": "fortunes"}, "steps": 2,
                       "seconds": 1.0, "train_samples": 16, "eval_samples": 8, "before": {}, "after": {}}
    with_rec = tmp_path / "recovered.yaml"
    with_rec.write_text(yaml.safe_dump(rec))
    js = tmp_path / "b.json"
    res = invoke("bench", with_rec, "--model", tiny_dir, "--recover", "--samples", 8, "--runs", 1, "--warmup", 0,
                 "--seq", 8, "--batch", 1, "--json", js)
    assert res.exit_code == 0, res.output
    assert "recovery: 2 steps" in res.stdout
    got = json.loads(js.read_text())
    assert got["extra"]["recovery"]["steps"] == 2 and got["extra"]["recovery"]["settings"]["batch_size"] == 8
    target = next(m for m in got["models"] if m["name"] == TARGET)
    assert target["fidelity"]["cosine"] == pytest.approx(got["extra"]["recovery"]["after"]["cosine"], abs=1e-4)


def test_bench_recover_on_a_directory_exits_2_with_one_line(applied) -> None:
    out, _ = applied
    res = invoke("bench", out, "--recover", "--runs", 1)
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "--recover applies to a recipe TARGET" in err[0]
