"""Errors a user can act on. The CLI prints them as one line and exits with ``exit_code``.

Library code speaks of settings (``batch_size``, ``out``): the recipe's fields and the arguments of
``train``. A message marks each setting it names with ``as_setting``: read as a string it says the
setting's name, and the CLI renders the same mark as the flag that sets it (``UserError.render``),
so no wording is tied to the flags. Recipe errors keep the recipe's own names, which recipe.toml
files use too.
"""
from __future__ import annotations

from collections.abc import Callable

# The ASCII unit separator: in no path, value or word a user types.
_MARK = "\x1f"


def as_setting(name: str) -> str:
    """``name``, marked in an error message as a setting (see the module's docstring)."""
    return f"{_MARK}{name}{_MARK}"


def one_line(text: str) -> str:
    """``text`` with each character a terminal would not show as itself (a newline, a terminal's
    escape, an undecodable byte of a file name held as a surrogate) written as its Python escape:
    a name from someone else's folder cannot split, recolour or forge a line of output."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class UserError(Exception):
    """Bad input or environment: a recipe value, a dataset file, an output folder. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def render(self, setting: Callable[[str], str]) -> str:
        """The message with each marked setting written by ``setting`` (its name, or its flag)."""
        parts = str(self.args[0] if self.args else "").split(_MARK)
        return "".join(setting(part) if i % 2 else part for i, part in enumerate(parts))

    @property
    def settings(self) -> tuple[str, ...]:
        """The settings the message names, in order."""
        return tuple(str(self.args[0] if self.args else "").split(_MARK)[1::2])

    def __str__(self) -> str:
        return self.render(lambda name: name)


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
