"""`kcpt` command line: prepare, train, tune, report, audit-tokenizer.

Each subcommand lives beside the code it drives (``register(subparsers)`` in ``kcpt.<area>.commands``);
this module only wires them together and turns :class:`~kcpt.errors.KcptError` into a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from kcpt import __version__
from kcpt.errors import KcptError

_COMMAND_MODULES = ["kcpt.data.commands", "kcpt.train.commands", "kcpt.tune.commands",
                    "kcpt.analysis.commands", "kcpt.model.commands"]


def run_job(argv: list[str] | None, description: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
            run: Callable[[argparse.Namespace], int]) -> int:
    """Entry of a ``jobs/*.py`` script: parse its arguments, run, and turn a KcptError into one line + exit 2."""
    p = argparse.ArgumentParser(description=description)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return int(run(args) or 0)
    except KcptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kcpt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kcpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KcptError as e:
        print(f"kcpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
