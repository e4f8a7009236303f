from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
import yaml

from slimformer.errors import ConfigError
from slimformer.hardware_profiles import (
    HardwareProfile,
    default_profile_name,
    list_profiles,
    load_profile,
    save_profile,
)
from slimformer.hardware_profiles.profile import PROFILES_DIR


def make_profile(**changes: object) -> HardwareProfile:
    fields: dict[str, object] = dict(
        name="toy-cpu-avx2-4t-torch",
        cpu="Toy CPU 9000",
        cores=8,
        threads=4,
        isa_flags=["avx2", "fma"],
        runtime="torch",
        runtime_version="2.14.1",
        peak_gflops_fp32=123.5,
        mem_bandwidth_gbs=21.25,
        per_op_overhead_us=3.5,
        created=date(2026, 1, 2),
        notes="hand-made for tests",
    )
    fields.update(changes)
    return HardwareProfile(**fields)


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_round_trip_is_equal_and_plain_yaml(tmp_path: Path) -> None:
    p = make_profile()
    out = save_profile(p, tmp_path / "sub" / "toy.yaml")
    assert out == tmp_path / "sub" / "toy.yaml"
    assert load_profile(str(out)) == p
    assert load_profile(out) == p  # PathLike works too
    raw = yaml.safe_load(out.read_text())
    assert raw["schema_version"] == 2  # v1 documents are saved as v2 (no optional sections)
    assert "latency_model" not in raw
    assert raw["created"] == "2026-01-02"
    assert "!!python" not in out.read_text()
    assert [f.name for f in out.parent.iterdir()] == ["toy.yaml"]  # no temp file left behind


def test_save_overwrites_existing(tmp_path: Path) -> None:
    path = tmp_path / "toy.yaml"
    save_profile(make_profile(), path)
    save_profile(make_profile(peak_gflops_fp32=1.0), path)
    assert load_profile(str(path)).peak_gflops_fp32 == 1.0


def test_unknown_key_is_config_error(tmp_path: Path) -> None:
    data = make_profile().model_dump(mode="json")
    data["turbo"] = True
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'turbo'"):
        load_profile(str(path))


def test_missing_and_invalid_values_are_config_errors(tmp_path: Path) -> None:
    data = make_profile().model_dump(mode="json")
    del data["peak_gflops_fp32"]
    with pytest.raises(ConfigError, match="missing key 'peak_gflops_fp32'"):
        load_profile(str(write_yaml(tmp_path / "a.yaml", data)))
    data = make_profile().model_dump(mode="json")
    data["mem_bandwidth_gbs"] = -1
    with pytest.raises(ConfigError, match="mem_bandwidth_gbs"):
        load_profile(str(write_yaml(tmp_path / "b.yaml", data)))
    data = make_profile().model_dump(mode="json")
    data["schema_version"] = 3
    with pytest.raises(ConfigError, match="schema_version 3 is not supported"):
        load_profile(str(write_yaml(tmp_path / "c.yaml", data)))


def test_bad_yaml_and_non_mapping_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML") as info:
        load_profile(str(broken))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"list\.yaml must be a YAML mapping"):
        load_profile(str(write_yaml(tmp_path / "list.yaml", [1, 2])))


def test_python_tags_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(str(path))


def test_unknown_name_lists_shipped_profiles() -> None:
    with pytest.raises(ConfigError, match="unknown hardware profile 'no-such-box'") as info:
        load_profile("no-such-box")
    msg = str(info.value)
    assert "\n" not in msg
    for name in list_profiles():
        assert name in msg
    assert "path" in msg


def test_missing_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(str(tmp_path / "nope.yaml"))


def test_shipped_profiles_load() -> None:
    names = list_profiles()
    assert default_profile_name() in names
    assert "amd-epyc-avx512-2t-torch" in names
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert p.peak_gflops_fp32 > 0 and p.mem_bandwidth_gbs > 0 and p.per_op_overhead_us > 0
    # and by path
    assert load_profile(str(PROFILES_DIR / f"{default_profile_name()}.yaml")) == load_profile(
        default_profile_name()
    )


def test_shipped_default_profile_describes_its_measurement() -> None:
    p = load_profile(default_profile_name())
    assert p.threads == 2
    assert p.runtime == "torch"
    assert "measure_profile" in p.notes
    assert p.created.isoformat() in p.notes


def test_shipped_calibrated_profile_has_physical_rates() -> None:
    """The machine numbers of the shipped onnxruntime profile are ones a 2-core server CPU can have: a
    calibration that subtracted a call overhead measured in a burst once wrote 4608 GB/s and 0.001 us."""
    p = load_profile("amd-epyc-avx512-1t-ort1-32")
    assert 5 <= p.mem_bandwidth_gbs <= 500
    assert 0.05 <= p.per_op_overhead_us <= 50
    assert 1 <= p.peak_gflops_fp32 <= 1000
    assert p.latency_model is not None and 0.5 <= p.latency_model.call_overhead_us <= 50
    assert p.latency_model.elementwise["add"].rmse_rel < 0.5  # the Add fit describes its measurements
