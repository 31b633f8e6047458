"""Errors a user can act on. The CLI prints them as one line and exits with ``exit_code``."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or environment: a recipe value, a dataset file, an output folder. Exit code 2."""

    exit_code = 2


class DatasetError(UserError):
    """A CIFAR-10 file is missing, truncated, corrupt, mislabelled or hostile."""


class RecipeError(UserError, ValueError):
    """A recipe value is impossible or a recipe file has an unknown key."""


class DivergenceError(UserError):
    """The loss became NaN or infinite: the LR is too high for the recipe. Exit code 3."""

    exit_code = 3
