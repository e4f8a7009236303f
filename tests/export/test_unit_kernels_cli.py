"""`apply --onnx`, `export` and `bench` follow each unit's recipe kernel; `--kernels exact|fast` override it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import invoke

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

FAST = ("--samples", "16", "--runs", "2", "--warmup", "1", "--seq", "8", "--batch", "1", "--threads", "1")


def _dqmm(path: Path) -> int:
    return sum(n.op_type == "DynamicQuantizeMatMul" for n in onnx.load(str(path)).graph.node)


def test_recipe_kernels_reach_apply_export_and_bench(tmp_path: Path, tiny_dir: Path) -> None:
    # int8-kernel matrices: query+key (4 units, one fused kernel per layer) and FFN in (2): 4 DynamicQuantizeMatMul;
    # --kernels fast adds the 4 output.dense (2 layers x attention output and FFN out): 8
    rules = [{"match": "re:.*attention.self.(query|key)", "spec": {"bits": 8, "kernel": "int8"}},  # 4 units
             {"match": "re:.*intermediate.dense", "spec": {"bits": 4, "group_size": 16, "kernel": "int8"}},  # 2
             {"match": "re:.*output.dense", "spec": {"bits": 4, "group_size": 16}}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"slimformer_recipe": 1, "model": {"id": str(tiny_dir)}, "rules": rules}))
    out = tmp_path / "out"
    res = invoke("apply", recipe, "--model", tiny_dir, "--out", out, "--onnx", "--samples", 16)
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stdout.splitlines() if "model.onnx" in x)
    assert "(per-unit kernels)" in line and float(line.split("mean cosine ")[1].split(",")[0]) > 0.9999
    assert _dqmm(out / "onnx" / "model.onnx") == 4
    assert "kernel: int8" in (out / "slimformer.yaml").read_text()
    again = tmp_path / "again.onnx"
    assert invoke("export", out, "--out", again).exit_code == 0 and _dqmm(again) == 4
    exact = tmp_path / "exact.onnx"
    res = invoke("export", out, "--out", exact, "--kernels", "exact")
    assert res.exit_code == 0 and "(exact kernels)" in res.stdout and _dqmm(exact) == 0
    fast = tmp_path / "fast.onnx"
    assert invoke("export", out, "--out", fast, "--kernels", "fast").exit_code == 0 and _dqmm(fast) == 8
    js = tmp_path / "b.json"
    res = invoke("bench", out, "--json", js, *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads(js.read_text())["extra"]["kernels"] == "per-unit"


def test_int8_kernel_on_a_32_bit_rule_exits_2(tmp_path: Path, tiny_dir: Path) -> None:
    doc = {"slimformer_recipe": 1, "model": {"id": "tiny"},
           "rules": [{"match": "encoder.layer.0.attention.self.query", "spec": {"bits": 32, "kernel": "int8"}}]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    res = invoke("apply", recipe, "--model", tiny_dir, "--out", tmp_path / "out", "--samples", 8)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "kernel 'int8' runs 8- or 4-bit weights" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
