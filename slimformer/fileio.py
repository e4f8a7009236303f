"""Small file helpers shared by configs, recipes, profiles and exports."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def atomic_write(path: Path, data: str | bytes) -> int:
    """Write via a temp file in the same folder and rename, so a reader never sees half a file.

    Returns the bytes written. Files are created 0644 (mkstemp's 0600 would hide shared outputs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(raw)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically (values JSON cannot hold are written as str)."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path, default: Any) -> Any:
    """The JSON in `path`, or `default` when the file does not exist."""
    return json.loads(path.read_text()) if path.exists() else default


def yaml_mapping(text: str, source: str, error: type[Exception], expected: str) -> dict[str, Any]:
    """Parse YAML that must be a mapping; `error(...)` with one line naming `source` otherwise."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error(f"{source}: {expected}")
    return data


def first_validation_error(exc: ValidationError) -> str:
    """`loc: message` of a pydantic error, with unknown keys said plainly."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = "unknown key (remove it or check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
    return f"{loc}: {msg}"
