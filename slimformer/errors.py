"""Error types. Every user-facing error carries a one-line message that says how to fix the input."""

from __future__ import annotations


class SlimformerError(ValueError):
    """Bad user input (config, model path, recipe, budget). The CLI prints it and exits with code 2."""


class ConfigError(SlimformerError):
    """A search config or search space that cannot be used as written."""


class PlanError(SlimformerError):
    """A compression plan or unit spec with values outside what the transforms support."""


class RecipeError(SlimformerError):
    """A recipe that does not validate or does not fit the model it is applied to."""


class ModelLoadError(SlimformerError):
    """A model path or id that cannot be loaded, or an architecture with no compressible units."""


class BudgetError(SlimformerError):
    """A memory or latency budget that no plan in the search space can meet."""
