"""CLI conventions: a light package import, help text on every option, one meaning per shared flag, one clean
`warning:` line per notice, and plain progress lines (no carriage returns) when stderr is not a terminal."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from helpers import invoke
from helpers import tiny_model_dir as _tiny_model_dir

from slimformer.cli import main
from slimformer.cli_errors import configure_output
from slimformer.errors import SlimformerWarning, notice
from slimformer.progress import LineProgress

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_output switches INFO logs off process-wide; later tests get them back."""
    prev = logging.root.manager.disable
    yield
    logging.disable(prev)
HEAVY = ("torch", "onnx", "onnxruntime", "optuna", "transformers", "timm", "ray", "matplotlib")


def test_package_and_cli_import_load_no_heavy_library() -> None:
    code = (f"import sys, slimformer, slimformer.cli; heavy = {HEAVY!r}; "
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at `import slimformer.cli`: {out.stdout}"


def test_help_and_version_run_without_heavy_imports() -> None:
    code = ("import sys, runpy; sys.argv = ['slimformer', '--version']\n"
            "try:\n    runpy.run_module('slimformer.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "slimformer, version 0.1.0" in out.stdout
    assert out.stdout.strip().endswith("heavy:"), out.stdout


def test_lazy_api_attributes_resolve() -> None:
    import slimformer
    from slimformer import api

    assert slimformer.apply_recipe is api.apply_recipe and slimformer.search is api.search
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slimformer.nope  # noqa: B018


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, f"{prefix}{name} ")
    return out


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [f"{path} {opt}" for path, cmd in [("", main), *_commands(main)] for p in cmd.params
               if isinstance(p, click.Option) and not p.help and (opt := "/".join(p.opts)) != "--help"]
    assert not missing, f"options without help text: {missing}"
    assert all(cmd.help for _, cmd in _commands(main)), "every command needs a docstring"


def test_shared_flags_mean_the_same_everywhere() -> None:
    seen: dict[str, list[tuple[str, bool, str]]] = {}
    for path, cmd in _commands(main):
        for p in cmd.params:
            if isinstance(p, click.Option):
                for o in p.opts:
                    seen.setdefault(o, []).append((path, p.is_flag, type(p.type).__name__))
    for flag in ("--json", "--no-progress", "--seq", "--batch", "--samples", "--threads", "--kernels"):
        kinds = {(is_flag, typ) for _, is_flag, typ in seen.get(flag, [])}
        assert len(kinds) <= 1, (flag, seen[flag])
    long_cmds = {"search", "apply", "export", "bench", "calibrate", "profile validate"}
    assert long_cmds <= {path for path, *_ in seen["--no-progress"]}


def test_docs_cli_lists_every_command() -> None:
    doc = (ROOT / "docs" / "CLI.md").read_text()
    for path, cmd in _commands(main):
        if not isinstance(cmd, click.Group):
            assert f"slimformer {path}" in doc, f"docs/CLI.md does not mention `slimformer {path}`"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model_dir(tmp_path_factory)


def test_inspect_json_to_file_and_stdout(tiny_model_dir: Path, tmp_path: Path) -> None:
    res = invoke("inspect", tiny_model_dir, "--json", tmp_path / "u.json")
    assert res.exit_code == 0, res.output
    assert "memory breakdown" in res.stdout and f"wrote {tmp_path / 'u.json'}" in res.stdout
    on_file = json.loads((tmp_path / "u.json").read_text())
    res2 = invoke("inspect", tiny_model_dir, "--json")
    assert json.loads(res2.stdout) == on_file


def test_notice_prints_one_clean_line_once(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        configure_output(verbose=False)
        for _ in range(3):
            notice("hardware profile x was made elsewhere")
        warnings.warn("library chatter", UserWarning, stacklevel=1)
        notice("another notice")
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: hardware profile x was made elsewhere", "warning: another notice"]


def test_verbose_shows_third_party_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, cat, *rest: print(f"{cat.__name__}: {msg}", file=sys.stderr)
        configure_output(verbose=True)
        warnings.warn("library chatter", UserWarning, stacklevel=1)
        notice("ours")
    assert capsys.readouterr().err.splitlines() == ["UserWarning: library chatter", "warning: ours"]


def test_notice_is_a_user_warning_for_python_callers() -> None:
    with pytest.warns(SlimformerWarning, match="made elsewhere"):
        notice("profile made elsewhere")


def test_line_progress_prints_whole_lines_every_tenth() -> None:
    buf = io.StringIO()
    bar = LineProgress(50, "trials", unit="trial", file=buf, every_seconds=1e9)
    for i in range(50):
        bar.update(1)
        bar.set_postfix_str(f"best {i}")  # each line shows the postfix set right after its update
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("[slimformer] trials: 5/50 trial (10%)") and lines[0].endswith("best 4")
    assert lines[-1].startswith("[slimformer] trials: 50/50 trial (100%)") and lines[-1].endswith("best 49")


def test_line_progress_disabled_prints_nothing() -> None:
    buf = io.StringIO()
    bar = LineProgress(10, "x", disable=True, file=buf)
    bar.update(10)
    bar.close()
    assert buf.getvalue() == ""


def test_apply_prints_a_notice_once_as_one_clean_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("slimformer_recipe: 1\nmodel: {id: tiny, sha256: " + "ab" * 32 + "}\n"
                      "rules:\n- match: 're:.*query'\n  spec: {bits: 8}\n")
    res = invoke("apply", recipe, "--model", tiny_model_dir, "--samples", "8")
    assert res.exit_code == 0, res.output
    err = res.stderr.splitlines()
    notices = [ln for ln in err if "recipe was made for weights" in ln]
    assert len(notices) == 1 and notices[0].startswith("warning: recipe was made for weights abababababab"), err
    assert not any("Warning:" in ln or ".py:" in ln for ln in err), err
    assert any(ln.startswith("[slimformer] scoring fidelity on 8 held-out") for ln in err), err


def test_line_progress_without_postfix_calls_still_prints_on_close() -> None:
    buf = io.StringIO()
    bar = LineProgress(4, "calibrate", file=buf, every_seconds=1e9)
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert buf.getvalue().splitlines()[-1].startswith("[slimformer] calibrate: 4/4 it (100%)")
