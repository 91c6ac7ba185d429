"""Where the Optuna study lives: one storage string → an Optuna storage, for the tune job and for readers.

Forms of ``tune.storage`` / ``--storage`` (the resolved string is what ``experiment.json`` records):

- ``None`` or ``sqlite`` → ``sqlite:///<experiment dir>/optuna.db``: the default, for one machine (SQLite's file
  locks are unreliable on network filesystems);
- ``journal`` → ``journal:///<experiment dir>/optuna.journal``; ``journal:///abs/path`` → that file: Optuna's
  ``JournalStorage`` (an append-only log guarded by a lock file), for trials on several
  nodes that share a filesystem but no database;
- anything else with ``://`` → an SQLAlchemy URL for ``RDBStorage``: ``postgresql+psycopg2://user:pw@host/db``
  (``pip install 'kcpt[postgres]'``), ``mysql+pymysql://…``, ``sqlite:///…``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kcpt.errors import ConfigError

JOURNAL_SCHEME = "journal://"
DEFAULT_SQLITE_NAME = "optuna.db"
DEFAULT_JOURNAL_NAME = "optuna.journal"


def resolve_storage(storage: str | None, experiment_dir: str | Path) -> str:
    """The storage URL for ``storage`` (a ``tune.storage`` value) of the experiment in ``experiment_dir``."""
    exp = Path(experiment_dir).resolve()
    if storage in (None, "", "sqlite"):
        return f"sqlite:///{exp / DEFAULT_SQLITE_NAME}"
    if storage == "journal":
        return f"{JOURNAL_SCHEME}{exp / DEFAULT_JOURNAL_NAME}"
    if storage.startswith(JOURNAL_SCHEME):
        journal_path(storage)  # validates
        return storage
    if "://" not in storage:
        raise ConfigError(f"tune.storage: '{storage}' is not a storage: use sqlite, journal, "
                          "journal:///absolute/path.journal or an SQLAlchemy URL (postgresql+psycopg2://…)")
    return storage


def journal_path(url: str) -> Path:
    """The file of a ``journal:///abs/path`` URL (absolute: every node must find the same file)."""
    path = url[len(JOURNAL_SCHEME):]
    if not path.startswith("/"):
        raise ConfigError(f"tune.storage: '{url}': a journal file must be absolute (journal:///shared/optuna.journal)"
                          "; 'journal' alone puts it in the experiment directory")
    return Path(path)


def open_storage(url: str) -> Any:
    """An Optuna storage object for a resolved URL (see :func:`resolve_storage`)."""
    import optuna

    if url.startswith(JOURNAL_SCHEME):
        from optuna.storages.journal import JournalFileBackend

        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return optuna.storages.RDBStorage(url)
    except ModuleNotFoundError as e:
        extra = " (pip install 'kcpt[postgres]')" if url.startswith("postgres") else ""
        raise ConfigError(f"tune.storage: the database driver for '{redact(url)}' is not installed: {e}{extra}") from e
    except SQLAlchemyError as e:
        first = str(e.orig if getattr(e, "orig", None) is not None else e).strip().splitlines()[0]
        raise ConfigError(f"tune.storage: cannot open the Optuna storage {redact(url)}: {type(e).__name__}: "
                          f"{first.replace(url, redact(url))}") from None


def redact(url: str) -> str:
    """``url`` without a password (for messages and logs)."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    cred, host = rest.split("@", 1)
    user = cred.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in cred else url


def study_exists(url: str, study_name: str) -> bool:
    """Whether ``study_name`` exists in the storage (a SQLite or journal file that does not exist: no)."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return False
    if url.startswith(JOURNAL_SCHEME) and not journal_path(url).exists():
        return False
    import optuna

    return study_name in optuna.get_all_study_names(open_storage(url))


def existing_study(url: str, study_name: str) -> Any:
    """The ``optuna.Study`` ``study_name`` in the storage, or None when it does not exist (nothing is created)."""
    if not study_exists(url, study_name):
        return None
    import optuna

    return optuna.load_study(study_name=study_name, storage=open_storage(url))


def delete_study(url: str, study_name: str) -> None:
    """Delete ``study_name`` from the storage if it is there."""
    if study_exists(url, study_name):
        import optuna

        optuna.delete_study(study_name=study_name, storage=open_storage(url))
