"""The model-family registry (timm-style): `@register_family("name")` on an adapter class makes
`get_family(name)` and `models.load` find it. `load` asks every family whether it recognises a local
directory (`detect`) or an id (`handles_id`), so adding a family is one registration, not an edit of
every place that used to branch on the family's name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from slimformer.errors import ModelLoadError
from slimformer.models.base import ModelAdapter

__all__ = ["detect_family", "families", "family_for_id", "get_family", "register_family", "unregister_family"]

A = TypeVar("A", bound=type[ModelAdapter])

_FAMILIES: dict[str, type[ModelAdapter]] = {}


def register_family(name: str) -> Callable[[A], A]:
    """Class decorator: register an adapter class as model family `name` (sets its `family` attribute)."""

    def deco(cls: A) -> A:
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            raise ValueError(f"model family {name!r} is already registered ({_FAMILIES[name].__name__})")
        cls.family = name
        _FAMILIES[name] = cls
        return cls

    return deco


def unregister_family(name: str) -> None:
    """Remove a registered family (tests registering a toy family clean up with this)."""
    _FAMILIES.pop(name, None)


def families() -> dict[str, type[ModelAdapter]]:
    """Registered families by name, in registration order."""
    return dict(_FAMILIES)


def get_family(name: str) -> type[ModelAdapter]:
    """The adapter class registered as `name`; the error lists the known names."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family {name!r}; known families: {', '.join(_FAMILIES)}") from None


def family_for_id(model_id: str) -> type[ModelAdapter] | None:
    """The family that builds `model_id` without a local directory (e.g. `timm:ARCH`), if any."""
    return next((cls for cls in _FAMILIES.values() if cls.handles_id(model_id)), None)


def detect_family(local_dir: Path, config: Mapping[str, Any]) -> type[ModelAdapter]:
    """The family of a model directory: the one specific family that recognises it, else a catch-all one."""
    hits = [cls for cls in _FAMILIES.values() if cls.detect(local_dir, config)]
    specific = [cls for cls in hits if not cls.catch_all]
    if len(specific) > 1:
        raise ModelLoadError(f"{local_dir}: recognised by several model families "
                             f"({', '.join(c.family for c in specific)}); the families' detect() overlap")
    chosen = specific or hits
    if not chosen:
        raise ModelLoadError(f"{local_dir}: no registered model family recognises this directory "
                             f"(known families: {', '.join(_FAMILIES)})")
    return chosen[0]
