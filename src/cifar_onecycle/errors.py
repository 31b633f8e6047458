"""Errors a user can act on. The CLI prints them as one line and exits with ``exit_code``.

Library code speaks of settings (``batch_size``, ``out``): the recipe's fields and the arguments of
``train``. An error names the settings it is about in ``settings``; the CLI writes them as the flags
that set them. Recipe errors keep the recipe's own names, which recipe.toml files use too.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or environment: a recipe value, a dataset file, an output folder. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *settings: str) -> None:
        super().__init__(message)
        self.settings = settings


class DatasetError(UserError):
    """A CIFAR-10 file is missing, truncated, corrupt, mislabelled or hostile."""


class RecipeError(UserError, ValueError):
    """A recipe value is impossible or a recipe file has an unknown key."""


class WriteError(UserError):
    """A file could not be written (a full disk, no permission); the file there before, if any, is
    unchanged. ``reason``: the system's word for it."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: cannot write ({reason}); the file there before, if any, is unchanged: "
                         f"free some space or choose another folder")
        self.reason = reason


class DivergenceError(UserError):
    """The loss became NaN or infinite: the LR is too high for the recipe. Exit code 3."""

    exit_code = 3


class NoLRFound(UserError):
    """The LR range test found no value for a setting given as ``auto``."""


class Interrupted(UserError):
    """SIGINT or SIGTERM: the run saved a checkpoint (when it has a folder) and stopped. Exit code 130."""

    exit_code = 130
