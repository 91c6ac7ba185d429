"""Error types. Every user-facing error says where (file, line/record, field) and what to do."""

from __future__ import annotations


class KcptError(Exception):
    """Base class for errors kcpt reports to users (the CLI prints them without a traceback)."""


class ConfigError(KcptError):
    """A config file or override is invalid; the message names the file and the key path."""


class InputError(KcptError):
    """A data input is invalid.

    The message names the file, the 1-based line (or record) number when there is one, and the field.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        self.path, self.line, self.field = path, line, field
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class CheckpointError(KcptError):
    """A checkpoint is missing, incomplete, or does not match the run (tokenizer/data/config hashes)."""


class TrainingAborted(KcptError):
    """Training stopped on purpose (e.g. too many anomaly rollbacks); the message says why."""
