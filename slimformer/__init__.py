"""slimformer: hardware-aware compression search for Transformers.

Search per-layer low rank, sparsity, bit-width and cross-layer sharing under a memory budget,
then re-apply the chosen plan from a YAML recipe.
"""

from __future__ import annotations

__version__ = "0.1.0"

from slimformer.api import apply_recipe, export_recipe, inspect_model, load_model, report, search  # noqa: E402

__all__ = ["__version__", "apply_recipe", "export_recipe", "inspect_model", "load_model", "report", "search"]
