"""Small file helpers shared by configs, recipes, profiles and exports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slimformer.errors import SlimformerError

MAX_DOCUMENT_BYTES = 1_000_000  # configs, recipes, model metadata: far below this; a bigger file is a mistake


def atomic_write(path: Path, data: str | bytes) -> int:
    """Write via a temp file in the same folder and rename, so a reader never sees half a file.

    Returns the bytes written. Files get the mode a plain open() would give (0666 less the umask; mkstemp's
    0600 would hide shared outputs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(raw)


TMP_TAG = ".slimformer-tmp."  # temp dirs are named .NAME.slimformer-tmp.HOST.PID.RANDOM next to NAME


def current_umask() -> int:
    """This process's umask (read from /proc where it exists: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temp_dirs(final: Path) -> list[Path]:
    """Remove the temp dirs that `atomic_dir` runs killed on this host left next to `final` (their owning pid no
    longer runs); others' files and live runs' temp dirs are left alone. Returns the removed paths."""
    final = Path(final)
    prefix = f".{final.name}{TMP_TAG}"
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.glob(f"{prefix}*"):
        host, _, rest = p.name[len(prefix):].rpartition(".")[0].rpartition(".")
        if not p.is_dir() or p.is_symlink() or host != socket.gethostname() or not rest.isdigit() \
                or _pid_alive(int(rest)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def normal_modes(root: Path) -> None:
    """Give a directory tree the modes plain mkdir/open give: 0777 (dirs, executables) or 0666, less the umask."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o111 else 0o666) & ~mask)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory in a temp dir next to `final` and rename it into place when the block ends without
    error, so `final` is either the old directory or the complete new one, never half of one.

    The temp dir is removed on any error; ones that killed runs left behind are removed on the next call for
    the same `final` (clean_stale_temp_dirs). Everything in it gets the modes mkdir/open would give
    (normal_modes: mkdtemp's 0700, and writers that create 0600 files, would hide shared outputs). An existing
    `final` is replaced (moved aside, then removed)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(final)
    tag = f".{final.name}{TMP_TAG}{socket.gethostname()}.{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=tag))
    try:
        yield tmp
        normal_modes(tmp)
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=tag)) if final.exists() else None
        if old is not None:
            os.replace(final, old)  # an empty dir is replaced by a rename
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically (values JSON cannot hold are written as str)."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path, default: Any, what: str = "JSON file",
              error: type[SlimformerError] = SlimformerError) -> Any:
    """The JSON in `path`, or `default` when the file does not exist; `error` (one line naming the file) when
    it cannot be read or is not JSON."""
    if not Path(path).exists():
        return default
    text = read_text_file(path, what, error=error, max_bytes=None)  # files slimformer wrote: no size cap
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path}: invalid JSON ({exc.msg} at line {exc.lineno}); fix or replace the file") \
            from None


def read_text_file(path: str | os.PathLike[str], what: str, error: type[SlimformerError] = SlimformerError,
                   max_bytes: int | None = MAX_DOCUMENT_BYTES) -> str:
    """The UTF-8 text of a file the user gave (config, recipe, data, model metadata), or `error` with one line
    naming `what`, the file and the fix: missing, a directory, unreadable, over `max_bytes`, not UTF-8."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a directory; pass a file")
    if not p.is_file():
        raise error(f"{what} {p} does not exist")
    try:
        with p.open("rb") as f:
            raw = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}; check its permissions") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise error(f"{what} {p} is over {max_bytes // 1_000_000} MB; a {what} is a small text file, check the path")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                    "save it as UTF-8") from None


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (`*name`, `<<: *name`): a few KB of nested aliases expand to
    gigabytes when the document is copied or validated ("billion laughs"); slimformer's files never need them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            anchor = self.peek_event().anchor
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{anchor}) are not allowed, write each "
                                              "value out", mark)
        return super().compose_node(parent, index)


def safe_load_yaml(text: str) -> Any:
    """yaml.safe_load without aliases (see _NoAliasLoader); raises yaml.YAMLError."""
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as `problem at line L, column C` (one line, without PyYAML's source excerpt)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())[:300]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def yaml_mapping(text: str, source: str, error: type[Exception], expected: str) -> dict[str, Any]:
    """Parse YAML that must be a mapping (no aliases); `error(...)` with one line naming `source` otherwise."""
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML ({yaml_problem(exc)})") from None
    except RecursionError:
        raise error(f"{source}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise error(f"{source}: {expected}")
    return data


def check_output_path(path: str | os.PathLike[str], option: str, kind: str = "file") -> Path:
    """Refuse an output path that cannot be written, before any compute: `kind` 'file' must not be a directory,
    'dir' must not be a file; its nearest existing ancestor must be a writable directory. Returns the path."""
    p = Path(path).expanduser()
    if kind == "file" and p.is_dir():
        raise SlimformerError(f"{option} {p} is a directory; name a file")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise SlimformerError(f"{option} {p} is a file; name a directory")
    if kind == "file" and p.exists() and not os.access(p, os.W_OK):
        raise SlimformerError(f"{option} {p} is not writable; choose another path")
    parent = p.absolute().parent if kind == "file" or not p.exists() else p.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SlimformerError(f"{option} {p}: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlimformerError(f"{option} {p}: directory {parent} is not writable; choose another path")
    return p


def first_validation_error(exc: ValidationError) -> str:
    """`loc: message` of a pydantic error, with unknown keys said plainly."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = "unknown key (remove it or check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
    return f"{loc}: {msg}"
