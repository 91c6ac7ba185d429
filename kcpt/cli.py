"""`kcpt` command line: prepare, train, tune, report, audit-tokenizer, eval.

Each subcommand lives beside the code it drives (``register(subparsers)`` in ``kcpt.<area>.commands``);
this module only wires them together and turns :class:`~kcpt.errors.KcptError` into a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from kcpt import __version__
from kcpt.errors import EXIT_BAD_INPUT, Terminated, exit_message

_COMMAND_MODULES = ["kcpt.data.commands", "kcpt.train.commands", "kcpt.tune.commands",
                    "kcpt.analysis.commands", "kcpt.model.commands", "kcpt.eval.commands"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), like every other kcpt error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_guarded(prefix: str, run: Callable[[], int]) -> int:
    """Run ``run()``; a KcptError or OSError becomes one line ``<prefix>error: ...`` on stderr and exit 2.

    A Ctrl-C is one line and exit 130; a closed stdout (``| head``) ends quietly with 141 (128 + SIGPIPE). Anything
    else is a bug in kcpt and keeps its traceback.
    """
    try:
        return int(run() or 0)
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(f"{prefix}{'terminated' if term else 'interrupted'}" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 143 if term else 130
    except BrokenPipeError:  # the reader of stdout went away (`kcpt report RUN | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail too
        return 141
    except Exception as e:
        msg = exit_message(e)
        if msg is None:
            raise
        print(f"{prefix}error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run_job(argv: list[str] | None, description: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
            run: Callable[[argparse.Namespace], int]) -> int:
    """Entry of a ``jobs/*.py`` script: parse its arguments, run, and turn a KcptError into one line + exit 2."""
    p = OneLineParser(description=description)
    add_arguments(p)
    args = p.parse_args(argv)
    return run_guarded("", lambda: run(args))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kcpt", description=__doc__.splitlines()[0])
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
    return run_guarded(f"kcpt {args.command}: ", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
