"""slimformer: hardware-aware compression search for Transformers.

Search per-layer low rank, sparsity, bit-width and cross-layer sharing under a memory budget,
then re-apply the chosen plan from a YAML recipe. The API is imported lazily (module `__getattr__`), so
`import slimformer` and `slimformer --help` do not load torch, onnx, optuna or transformers.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "apply_recipe", "export_recipe", "inspect_model", "load_model", "report", "search"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from slimformer.api import apply_recipe, export_recipe, inspect_model, load_model, report, search


def __getattr__(name: str) -> Any:
    """Import slimformer.api on first use of one of its functions (keeps the package import light)."""
    if name in __all__:
        from slimformer import api

        return getattr(api, name)
    raise AttributeError(f"module 'slimformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module's type: `slimformer.search` stays the API function when the subpackage of the same
    name is imported (the import system's binding of `slimformer.search` to the subpackage is ignored; the
    subpackage itself lives in sys.modules["slimformer.search"], which is what `import slimformer.search.x`
    uses). This is what the eager `from slimformer.api import search` used to give."""

    @property
    def search(self) -> Any:
        from slimformer.api import search

        return search

    @search.setter
    def search(self, value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package
