from __future__ import annotations

from pathlib import Path

import torch

from slimformer.hardware_profiles import load_profile, measure_profile
from slimformer.hardware_profiles.machine import cpu_info, default_name
from slimformer.hardware_profiles.torch_rates import main


def test_quick_measure_returns_positive_numbers_and_restores_threads() -> None:
    before = torch.get_num_threads()
    p = measure_profile(threads=1, quick=True)
    assert torch.get_num_threads() == before
    assert p.threads == 1
    assert p.cores >= 1
    assert p.peak_gflops_fp32 > 0
    assert p.mem_bandwidth_gbs > 0
    assert p.per_op_overhead_us > 0
    assert p.runtime == "torch" and p.runtime_version == torch.__version__
    assert p.cpu
    assert p.name.endswith("-1t-torch")
    assert "measure_profile(threads=1, quick=True)" in p.notes


def test_cpu_info_and_default_name() -> None:
    model, flags = cpu_info()
    assert isinstance(model, str) and model
    assert all(isinstance(f, str) for f in flags)
    xeon = "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz"
    assert default_name(xeon, ["avx2", "avx512f", "amx_tile"], 8) == "intel-xeon-platinum-8480-amx-8t-torch"
    assert default_name("AMD EPYC", ["avx2"], 2) == "amd-epyc-avx2-2t-torch"


def test_cli_writes_a_loadable_profile(tmp_path: Path, capsys) -> None:
    out = tmp_path / "me.yaml"
    assert main(["--threads", "1", "--quick", "--out", str(out), "--name", "me", "--notes", "ci"]) == 0
    p = load_profile(str(out))
    assert p.name == "me" and p.notes == "ci" and p.threads == 1
    assert "GFLOP/s" in capsys.readouterr().out


def test_cli_rejects_zero_threads(tmp_path: Path, capsys) -> None:
    assert main(["--threads", "0", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "threads must be >= 1" in capsys.readouterr().err
