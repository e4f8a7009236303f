"""`latency: {source: auto}` prices this machine: a search with a calibrated profile from another CPU says so in
one line, calibrates this machine once (a real calibration, on a tiny grid), caches it, and reuses the cache;
`source: calibrated` keeps the foreign profile and labels it with its CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers import invoke, tiny_config, tiny_model_dir, write_config  # noqa: E402

from slimformer.export.kernels import KernelChoice  # noqa: E402
from slimformer.hardware_profiles import load_profile, local_profile  # noqa: E402
from slimformer.hardware_profiles.calibrate import CalibrationGrid  # noqa: E402
from slimformer.hardware_profiles.local_profile import CACHE_ENV, MachineKey, cache_dir, made_here  # noqa: E402
from slimformer.hardware_profiles.sampling import RepeatPolicy  # noqa: E402

SHIPPED = "amd-epyc-avx512-1t-ort1-32"
TINY_GRID = CalibrationGrid(
    m_values=(1, 16), dims=(16, 32, 64),
    linear=(KernelChoice("matmul", 32), KernelChoice("dequant_gemm", 8), KernelChoice("matmulnbits", 8, 32, 32),
            KernelChoice("matmulnbits", 4, 32, 32)),
    embedding=(KernelChoice("gather", 32), KernelChoice("gather_block_quantized", 4, 32, 32),
               KernelChoice("gather_block_quantized", 8, 32, 32)),
    heads=(1, 4), seqs=(16,), head_dims=(8,), elem_rows=(1, 16), elem_widths=(32,), references=(),
    policy=RepeatPolicy(min_passes=2, max_passes=2, pass_s=0.001, max_runs=5), seconds=20.0, quick_mode=True)


@pytest.fixture
def foreign_profile(tmp_path: Path) -> Path:
    """The shipped calibrated profile as if made on another CPU."""
    data = load_profile(SHIPPED).model_dump(mode="json") | {"cpu": "Some Other CPU", "name": "other-cpu-1t"}
    path = tmp_path / "other-cpu.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _search(tmp_path: Path, model: Path, profile: Path, run: str, source: str = "auto") -> tuple[list[str], dict]:
    cfg = tiny_config(model, tmp_path / run, trials=2, baselines=False, start_points="none",
                      hardware_profile=str(profile), latency={"source": source, "batch": 1, "seq": 16})
    res = invoke("search", write_config(tmp_path / f"{run}.yaml", cfg), "--no-progress")
    assert res.exit_code == 0, res.stderr
    return res.stderr.splitlines(), json.loads((tmp_path / run / "summary.json").read_text())


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "slimformer" / "profiles"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "profiles"
    a, b = MachineKey.here(1), MachineKey.here(2)
    assert a.file_name() != b.file_name() and a.file_name().endswith(".yaml") and "1t" in a.file_name()


def test_auto_calibrates_a_foreign_profile_once_and_reuses_the_cache(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        foreign_profile: Path) -> None:
    import slimformer.hardware_profiles.profile as profile_mod

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(local_profile, "AUTO_GRID", TINY_GRID)  # a tiny grid: the calibration still runs for real
    monkeypatch.setattr(profile_mod, "PROFILES_DIR", tmp_path / "none-shipped")  # as on a CPU we never calibrated
    model = tiny_model_dir(tmp_path_factory)
    lines, summary = _search(tmp_path, model, foreign_profile, "run1")
    said = [ln for ln in lines if "calibrat" in ln]
    assert len(said) == 1 and "calibrating it once" in said[0] and "Some Other CPU" in said[0], lines
    cached = list((tmp_path / "cache" / "profiles").glob("*.yaml"))
    assert len(cached) == 1 and cached[0].name == MachineKey.here(1).file_name()
    local = load_profile(cached[0])
    assert local.calibrated and made_here(local, 1) and local.calibration is not None and local.calibration.quick
    assert summary["latency_source"] == "calibrated" and local.version in summary["latency_label"]
    assert "calibrated on" not in summary["latency_label"], "this machine's own model"
    assert not [ln for ln in lines if "made elsewhere" in ln], "nothing foreign priced the search"
    stamp = cached[0].stat().st_mtime_ns

    lines, summary = _search(tmp_path, model, foreign_profile, "run2")
    said = [ln for ln in lines if "calibrat" in ln]
    assert len(said) == 1 and "cached calibration" in said[0] and "calibrating" not in said[0], lines
    assert cached[0].stat().st_mtime_ns == stamp, "the cache was reused, not re-made"
    assert summary["hardware_profile_version"] == local.version


def test_calibrated_source_keeps_a_foreign_profile_and_labels_its_cpu(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        foreign_profile: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    lines, summary = _search(tmp_path, tiny_model_dir(tmp_path_factory), foreign_profile, "run", "calibrated")
    assert not (tmp_path / "cache").exists(), "no calibration"
    assert summary["hardware_profile"] == "other-cpu-1t"
    assert summary["latency_label"].startswith("calibrated on Some Other CPU")
    assert [ln for ln in lines if "made elsewhere" in ln], "and the mismatch line"
    assert "calibrated on Some Other CPU" in (tmp_path / "run" / "report.html").read_text()


def test_same_cpu_name_with_other_isa_flags_is_another_machine() -> None:
    from slimformer.hardware_profiles.machine import cpu_info, mismatch

    cpu, isa = cpu_info()
    here = load_profile(SHIPPED).model_copy(update={"cpu": cpu, "isa_flags": isa})
    other = here.model_copy(update={"isa_flags": [*isa, "amx_int8"]})
    assert made_here(here, here.threads) or here.runtime_version != MachineKey.here(1).runtime_version
    assert not made_here(other, other.threads)
    msg = mismatch(other)
    assert msg is not None and "ISA flags" in msg and "amx_int8" in msg


def test_a_shipped_profile_made_on_this_cpu_is_used_without_calibrating(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, foreign_profile: Path) -> None:
    import slimformer.hardware_profiles.profile as profile_mod

    key = MachineKey.here(1)
    shipped_dir = tmp_path / "shipped"
    shipped_dir.mkdir()
    mine = load_profile(SHIPPED).model_dump(mode="json") | {
        "name": "this-cpu-1t", "cpu": key.cpu, "isa_flags": list(key.isa_flags), "runtime_version": key.runtime_version,
        "threads": 1}
    (shipped_dir / "this-cpu-1t.yaml").write_text(yaml.safe_dump(mine, sort_keys=False))
    (shipped_dir / "a-foreign-one.yaml").write_text(foreign_profile.read_text())
    monkeypatch.setattr(profile_mod, "PROFILES_DIR", shipped_dir)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(local_profile, "AUTO_GRID", TINY_GRID)
    said: list[str] = []
    got = local_profile.auto_profile(load_profile(foreign_profile), 1, log=said.append)
    assert got.name == "this-cpu-1t" and made_here(got, 1)
    assert len(said) == 1 and "shipped profile this-cpu-1t" in said[0] and "Some Other CPU" in said[0], said
    assert not (tmp_path / "cache").exists(), "no calibration, nothing cached"
    assert local_profile.shipped_made_here(2) is None, "another thread count is another machine"
