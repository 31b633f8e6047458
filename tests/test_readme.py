"""The README is the user's manual: its commands must run as printed, so each one is checked against
the command line and the recipes as they are now (parsed and its recipe built; nothing trained). The
notebook's text cells are held to the same."""
import argparse
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

from cifar_onecycle import cli
from cifar_onecycle.sweep import make_plan
from cifar_onecycle.sweep_plan import parse_point, parse_vary

README = Path(__file__).resolve().parent.parent / "README.md"
NOTEBOOK = README.parent / "examples" / "quickstart.ipynb"
TORCHRUN_FLAGS = {"--standalone", "--nproc-per-node"}  # torchrun's own, before `-m cifar_onecycle`
PYTEST_FLAGS = {"--dist"}  # pytest-xdist's, in "Tests"


def readme_commands(text: str) -> list[str]:
    """The ``cifar-onecycle`` command lines of the README's fenced blocks, continuation lines joined,
    comments and a console's "$ " taken off; under torchrun, the part after ``-m cifar_onecycle``. A
    synopsis reads as its first form: ``[--tta]`` as ``--tta``, ``exp|linear|both`` as ``exp``."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if " -m cifar_onecycle " in line:
                line = "cifar-onecycle " + line.split(" -m cifar_onecycle ", 1)[1]
            if line.startswith("cifar-onecycle "):
                line = re.sub(r"\[([^]]*)\]", r"\1", line)
                commands.append(re.sub(r"(\w+)(?:\|\w+)+", r"\1", " ".join(shlex.split(line, comments=True))))
    return commands


def notebook_text() -> str:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")


def all_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= all_flags(sub)
    return flags


def test_the_readme_reads_its_commands_as_printed():
    assert readme_commands("```bash\ncifar-onecycle lr-find [--mode exp|linear|both]  # a note\n"
                           "torchrun --standalone -m cifar_onecycle train \\\n    --out x\n```\n"
                           "`cifar-onecycle evaluate X`\n```\n$ cifar-onecycle summary\ndry run: ...\n```\n") == [
        "cifar-onecycle lr-find --mode exp", "cifar-onecycle train --out x", "cifar-onecycle summary"]


def test_every_flag_the_readme_names_is_one_of_the_commands():
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README.read_text() + notebook_text()))
    assert named - TORCHRUN_FLAGS - PYTEST_FLAGS - all_flags(cli.build_parser()) == set()


@pytest.mark.parametrize("command", readme_commands(README.read_text()) + readme_commands(notebook_text()))
def test_each_readme_command_parses_and_makes_its_recipe(command):
    words = shlex.split(command)[1:]
    if "--help" in words:
        with pytest.raises(SystemExit) as shown:
            cli.build_parser().parse_args(words)
        assert shown.value.code == 0
        return
    args = cli.build_parser().parse_args(words)
    if args.command in ("train", "lr-find", "sweep"):
        recipe = cli.recipe_from_args(args)
        if args.command == "sweep":
            make_plan(recipe, parse_vary(args.vary), args.seeds,
                      parse_point(args.baseline) if args.baseline else None,
                      [parse_point(spec, "point") for spec in args.point] or None, workers=1)


def test_the_readme_shows_commands_of_each_kind():
    kinds = {shlex.split(command)[1] for command in readme_commands(README.read_text())}
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert kinds == set(commands) and len(kinds) >= 8


def test_the_python_the_readme_names_is_there():
    text = README.read_text()
    imports = re.findall(r"^from (cifar_onecycle[\w.]*) import (.+)$", text, re.M)
    dotted = re.findall(r"`(cifar_onecycle(?:\.\w+)+)", text)
    assert len(imports) >= 2 and len(dotted) >= 4
    for module, names in imports:
        for name in names.split(","):
            assert hasattr(importlib.import_module(module), name.strip()), f"from {module} import {name}"
    for path in dotted:
        parts = path.split(".")
        # the longest importable prefix, then attributes
        for cut in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attribute in parts[cut:]:
            assert hasattr(found, attribute), path
            found = getattr(found, attribute)
