"""Error types. Every user-facing error says where (file, line/record, field) and what to do.

Every command and job turns a :class:`KcptError` (and an ``OSError``: permissions, disk full, unreadable
files) into ONE line on stderr and exit status 2 (:func:`exit_message`); no traceback. The classes:

- :class:`ConfigError`: a config file, a ``--set`` override or a flag is invalid (names file and key path);
- :class:`InputError`: a data input, an output directory or a run directory is unusable (names file, line,
  field);
- :class:`CheckpointError`: a checkpoint is missing, incomplete, corrupt or built for another run;
- :class:`TrainingAborted`: training stopped on purpose (e.g. too many anomaly rollbacks).
"""

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


class Terminated(KeyboardInterrupt):
    """A SIGTERM (``ray job stop``, a node shutting down) while a run trains: it ends like a Ctrl-C, with one line
    and the run directory left to ``--resume`` (exit status 143)."""


class TrainingAborted(KcptError):
    """Training stopped on purpose (e.g. too many anomaly rollbacks); the message says why."""


EXIT_BAD_INPUT = 2
"""Exit status of a command that refused its input (config, data, paths, checkpoints)."""


def one_line(text: str) -> str:
    """``text`` folded to one line (newlines become ``; ``), for stderr messages."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def exit_message(err: BaseException) -> str | None:
    """The one-line message for an error a command should report without a traceback, or None for a bug.

    :class:`KcptError` → its message; ``OSError`` (permissions, disk full, a vanished file) → ``<file>: <what
    failed>``; anything else (a bug in kcpt) → None.
    """
    if isinstance(err, KcptError):
        return one_line(str(err))
    if isinstance(err, OSError):
        where = err.filename if err.filename is not None else None
        what = err.strerror or str(err) or type(err).__name__
        extra = f" -> {err.filename2}" if getattr(err, "filename2", None) else ""
        return one_line(f"{where}{extra}: {what}" if where is not None else what) + f" ({storage_hint(what)})"
    return None


def storage_hint(message: str) -> str:
    """What to check for an I/O error, from its message: an object store's error names its cause (pyarrow's
    ``AWS Error <CODE>``), a local one is about the path."""
    if "AWS Error" not in message and "google" not in message.lower():
        return "check the path, its permissions and free disk space"
    if "NO_SUCH_BUCKET" in message or "bucket does not exist" in message:
        return "the bucket does not exist: create it, or fix the bucket in the URI"
    if "NETWORK_CONNECTION" in message or "Could not connect" in message or "Could not resolve" in message:
        return "cannot reach the object store: check AWS_ENDPOINT_URL (unset for AWS itself) and the network"
    if any(code in message for code in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                        "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "403")):
        return ("the object store refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the "
                "instance role) and the bucket's permissions")
    return "check the URI, AWS_ENDPOINT_URL and the credentials"
