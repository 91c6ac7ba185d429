"""Storage by URI: local paths, shared-FS paths and object stores (``s3://``, ``gs://``) through ``pyarrow.fs``.

Why pyarrow.fs: Ray Train persists to ``RunConfig(storage_path=...)`` through pyarrow.fs, so one filesystem layer
(and one set of credentials: the standard ``AWS_*`` variables incl. ``AWS_ENDPOINT_URL``, or GCP's default
credentials) serves kcpt and Ray alike; it ships with Ray Data's pyarrow, needs no s3fs/gcsfs, and streams
large files (multipart uploads) without holding them in memory.

Model: a URI root is *remote*; kcpt works in a node-local *mirror* of it (:func:`local_path_for`) and publishes
files to the remote with single-object writes (a PUT is atomic: readers see the old object or the new one).
Directories that must appear whole (checkpoints, prepared datasets) are published file by file with a marker
file (their ``manifest.json``) written **last**, and retracted marker first: a reader that finds the marker
with every listed file finds a complete directory (:func:`fetch_tree`). Local paths are used in place.

Node-local scratch (mirrors and downloads) is ``$KCPT_SCRATCH`` or ``<tmp>/kcpt-scratch``, keyed by the Ray node
inside Ray workers, so processes on two nodes of a test cluster on one machine never share a file by accident.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
"""URI schemes handled by pyarrow.fs (anything else with ``://`` is refused)."""


def is_uri(s: str | os.PathLike | None) -> bool:
    """True for ``scheme://...`` with a remote scheme (``file://`` counts as a local path)."""
    return isinstance(s, str) and "://" in s and not s.startswith("file://")


def check_uri(s: str, where: str = "path") -> None:
    """ConfigError unless ``s`` is a local path or a URI of a scheme kcpt can store to."""
    from kcpt.errors import ConfigError

    if is_uri(s) and urlparse(s).scheme not in REMOTE_SCHEMES:
        raise ConfigError(f"{where}: '{s}': unsupported URI scheme '{urlparse(s).scheme}' (use a local path, "
                          f"a shared-FS path, or one of {', '.join(x + '://' for x in REMOTE_SCHEMES)})")
    if is_uri(s) and not urlparse(s).netloc:
        raise ConfigError(f"{where}: '{s}': no bucket in the URI (expected e.g. s3://bucket/prefix)")


def check_bucket(uri: str, where: str) -> None:
    """InputError unless the bucket of ``uri`` exists and answers (one metadata request): checked before a job
    starts Ray or prepares anything, so a typo in a bucket name does not fail minutes later on a worker."""
    import pyarrow.fs as pafs

    from kcpt.errors import InputError, storage_hint

    check_uri(uri, where)
    bucket = f"{urlparse(uri).scheme}://{urlparse(uri).netloc}"
    try:
        info = Store(bucket).info()
    except OSError as e:
        raise InputError(f"{where}: {uri}: {e} ({storage_hint(str(e))})") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{where}: {uri}: the bucket '{urlparse(uri).netloc}' does not exist (create it, or fix the "
                         "bucket in the URI)")


def local_path(s: str) -> Path:
    """A local path string (``file://`` stripped, ``~`` expanded), absolute."""
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(s).expanduser().resolve()


def join(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...`` for a URI (string join) or a local path."""
    if is_uri(str(root)):
        return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def display(ref: str | os.PathLike) -> str:
    return str(ref)


# --------------------------------------------------------------------------- node-local scratch


def _node_key() -> str:
    """The Ray node id inside a Ray worker/actor process, else ``"local"``."""
    try:
        import ray

        if ray.is_initialized():
            from ray._private.worker import WORKER_MODE, global_worker

            if global_worker.mode == WORKER_MODE:
                return "node-" + ray.get_runtime_context().get_node_id()[:16]
    except Exception:  # noqa: BLE001 - no Ray, or an old Ray: a plain local scratch
        pass
    return "local"


def live_node_keys() -> set[str] | None:
    """The scratch keys (:func:`_node_key`) of the Ray cluster's live nodes, or None outside a Ray worker."""
    if _node_key() == "local":
        return None
    import ray

    return {"node-" + n["NodeID"][:16] for n in ray.nodes() if n.get("Alive")}


def scratch_root() -> Path:
    """Node-local scratch for mirrors and downloads (``$KCPT_SCRATCH`` or ``<tmp>/kcpt-scratch``, per Ray node)."""
    base = os.environ.get("KCPT_SCRATCH") or os.path.join(tempfile.gettempdir(), f"kcpt-scratch-{os.getuid()}")
    p = Path(base) / _node_key()
    p.mkdir(parents=True, exist_ok=True)
    return p


def local_path_for(uri: str) -> Path:
    """The node-local mirror path of a remote URI (``<scratch>/uri/<scheme>/<bucket>/<key>``)."""
    u = urlparse(uri)
    parts = [p for p in u.path.split("/") if p not in ("", ".", "..")]
    return scratch_root().joinpath("uri", u.scheme, u.netloc, *parts)


@contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created), for processes of one node. ``blocking=False``: raise
    :class:`BlockingIOError` at once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- remote store


class Store:
    """Files under one remote URI root, through pyarrow.fs. Paths given to methods are relative (``a/b.json``)."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        check_uri(uri)
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.base = pafs.FileSystem.from_uri(self.uri)
        except Exception as e:  # noqa: BLE001 - ArrowInvalid / OSError from the filesystem factory
            from kcpt.errors import ConfigError

            raise ConfigError(f"{uri}: cannot open this storage URI ({e}); check the bucket name and credentials "
                              "(AWS_* / AWS_ENDPOINT_URL, or GOOGLE_APPLICATION_CREDENTIALS)") from None
        self.base = self.base.rstrip("/")

    def _p(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return f"{self.base}/{rel}" if rel else self.base

    def uri_of(self, rel: str) -> str:
        return join(self.uri, rel) if rel else self.uri

    def child(self, rel: str) -> Store:
        return Store(self.uri_of(rel))

    # ----------------------------------------------------------------- queries
    def info(self, rel: str = "") -> Any:
        return self.fs.get_file_info(self._p(rel))

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.info(rel).type == pafs.FileType.File

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        if self.info(rel).type != pafs.FileType.NotFound:
            return True
        return bool(self.listdir(rel))  # object stores: a "directory" exists while it holds objects

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and sub-directories); [] when absent."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self._p(rel), recursive=False, allow_not_found=True)
        base = self._p(rel).rstrip("/") + "/"
        return sorted({i.path[len(base):].split("/")[0] for i in self.fs.get_file_info(sel)
                       if i.path.startswith(base)})

    def walk(self, rel: str = "") -> dict[str, int]:
        """Every file under ``rel``: relative path → size in bytes."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self._p(rel), recursive=True, allow_not_found=True)
        base = self._p(rel).rstrip("/") + "/"
        return {i.path[len(base):]: int(i.size) for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File and i.path.startswith(base)}

    # ----------------------------------------------------------------- bytes
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def read_range(self, rel: str, offset: int, n: int) -> bytes:
        """``n`` bytes of file ``rel`` from ``offset`` (one range request on an object store)."""
        with self.fs.open_input_file(self._p(rel)) as f:
            return f.read_at(n, offset)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One object, written whole (atomic on object stores)."""
        with self.fs.open_output_stream(self._p(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def delete(self, rel: str) -> None:
        import pyarrow.fs as pafs

        if self.info(rel).type == pafs.FileType.File:
            self.fs.delete_file(self._p(rel))

    def delete_tree(self, rel: str) -> None:
        import pyarrow.fs as pafs

        if self.info(rel).type == pafs.FileType.Directory or self.walk(rel):
            self.fs.delete_dir(self._p(rel))

    # ----------------------------------------------------------------- files and trees
    def upload_file(self, local: Path, rel: str) -> None:
        with open(local, "rb") as src, self.fs.open_output_stream(self._p(rel)) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    def download_file(self, rel: str, local: Path) -> None:
        """Download to ``local`` atomically (a temp sibling renamed into place)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.dl-{os.getpid()}")
        with self.fs.open_input_stream(self._p(rel)) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(tmp, local)

    def upload_tree(self, local: Path, rel: str, *, last: tuple[str, ...] = (), only: set[str] | None = None) -> None:
        """Upload the files under ``local`` to ``rel`` (``only``: these relative names); the names in ``last``
        (e.g. ``manifest.json``) after every other file."""
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        if only is not None:
            files = [f for f in files if f in only]
        for name in [f for f in files if f not in last] + [f for f in last if f in files]:
            self.upload_file(local / name, f"{rel}/{name}" if rel else name)

    def download_tree(self, rel: str, local: Path, *, skip: Callable[[str], bool] | None = None) -> dict[str, int]:
        """Download every file under ``rel`` into ``local``; returns name → size."""
        files = self.walk(rel)
        for name in files:
            if skip is None or not skip(name):
                self.download_file(f"{rel}/{name}" if rel else name, local / name)
        return files


def store_and_rel(uri: str) -> tuple[Store, str]:
    """``(Store(bucket root), key)`` for a URI."""
    u = urlparse(uri)
    return Store(f"{u.scheme}://{u.netloc}"), u.path.strip("/")


# --------------------------------------------------------------------------- whole directories


def publish_tree(local: Path, uri: str, *, marker: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Upload directory ``local`` to ``uri`` so that readers see it whole or not at all: an existing ``marker``
    there is retracted first, stale files are removed (except ``keep``: files other processes uploaded there
    for this publication), then every file, then ``marker`` last. ``local`` is then marked as fetched (a later
    :func:`fetch_tree` of ``uri`` on this node reuses it)."""
    store, rel = store_and_rel(uri)
    store.delete(f"{rel}/{marker}")
    have = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} - {MARKER_COPY}
    for name in store.walk(rel):
        if name not in have and name not in keep:
            store.delete(f"{rel}/{name}")
    store.upload_tree(local, rel, last=(marker,), only=have)
    if local == local_path_for(uri):
        (local / MARKER_COPY).write_bytes((local / marker).read_bytes())


def retract_tree(uri: str, *, marker: str) -> None:
    """Delete a published directory: its marker first (it is never seen half-deleted), then the rest."""
    store, rel = store_and_rel(uri)
    store.delete(f"{rel}/{marker}")
    store.delete_tree(rel)


def _has(local: Path, name: str, size: int) -> bool:
    f = local / name
    return f.is_file() and f.stat().st_size == size


MARKER_COPY = ".kcpt-fetched"
"""Written last into a fetched directory: the bytes of the remote marker it was fetched against."""


@dataclass
class FetchStats:
    """What :func:`fetch_tree` did in this process, in bytes: ``whole`` adds the size of a published directory the
    first time this node's mirror of it is made (what a fetch of everything would download), ``downloaded``
    what was downloaded (the parts asked for)."""

    whole: int = 0
    downloaded: int = 0


FETCHED = FetchStats()


def fetch_tree(ref: str | os.PathLike, *, marker: str, files_of: Callable[[dict[str, Any]], dict[str, int]] | None
               = None, skip: Callable[[str], bool] | None = None, mirror_suffix: str = "") -> Path:
    """A local directory holding the published directory ``ref`` (a URI: downloaded into scratch once per node,
    reused while the remote marker is unchanged; a local path: itself).

    ``marker`` names the JSON file published last (see :func:`publish_tree`); ``files_of(marker_json)`` lists the
    files it vouches for (name → size), which must all be present at ``ref`` (a half-uploaded directory is
    refused with ``FileNotFoundError``). Without ``files_of`` every file present is taken. ``skip(name)``: files
    this caller does not need. The node's mirror then holds a part of ``ref``; a later call on the node (another
    rank, another part) downloads only the files it needs that are not there yet, each renamed into place whole,
    so processes reading the mirror never see a partial file. ``mirror_suffix``: a separate mirror of that name."""
    if not is_uri(str(ref)):
        return local_path(str(ref)) if isinstance(ref, str) else Path(ref)
    uri = str(ref)
    store, rel = store_and_rel(uri)
    try:
        marker_bytes = store.read_bytes(f"{rel}/{marker}")
    except (FileNotFoundError, OSError):
        raise FileNotFoundError(f"{uri}: no {marker} (not published, or an upload was interrupted)") from None
    listed = files_of(json.loads(marker_bytes)) if files_of is not None else None
    local = local_path_for(uri)
    if mirror_suffix:
        local = local.with_name(local.name + mirror_suffix)

    def needed(names: Iterable[str]) -> list[str]:
        return [n for n in names if n != marker and (skip is None or not skip(n))]

    with file_lock(local.parent / f".{local.name}.fetch-lock"):
        current = (local / MARKER_COPY).is_file() and (local / MARKER_COPY).read_bytes() == marker_bytes
        if current and (listed is None or all(_has(local, n, listed[n]) for n in needed(listed))):
            return local
        remote = store.walk(rel)
        missing = [n for n, s in (listed or {}).items() if remote.get(n) != s]
        if missing:
            raise FileNotFoundError(f"{uri}: {marker} lists files that are missing or of another size: "
                                    f"{missing[:3]} (an upload in progress or interrupted)")
        files = {n: size for n, size in remote.items() if n != marker}
        if current:  # a part is here (another rank's, or the model without the engine state): add what is not
            todo = {n: files[n] for n in needed(listed or {}) if not _has(local, n, files[n])}
            for name in todo:
                store.download_file(f"{rel}/{name}", local / name)
            _count(uri, todo, files, first=False)
            return local
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}-{hashlib.sha1(os.urandom(8)).hexdigest()[:6]}")
        try:
            todo = {n: files[n] for n in needed(files)}
            for name in todo:
                store.download_file(f"{rel}/{name}", tmp / name)
            _count(uri, todo, files, first=True)
            tmp.mkdir(parents=True, exist_ok=True)  # every other file may be skipped: the marker alone
            (tmp / marker).write_bytes(marker_bytes)
            (tmp / MARKER_COPY).write_bytes(marker_bytes)
            if local.exists():
                shutil.rmtree(local)
            os.rename(tmp, local)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return local


def _count(uri: str, got: dict[str, int], files: dict[str, int], *, first: bool) -> None:
    whole = sum(files.values())
    FETCHED.downloaded += sum(got.values())
    FETCHED.whole += whole if first else 0
    if got:
        log.info("%s: downloaded %d files, %.1f MB of its %.1f MB%s", uri, len(got), sum(got.values()) / 1e6,
                 whole / 1e6, "" if len(got) == len(files) else " (the parts this process needs)")


# --------------------------------------------------------------------------- inputs


def _sync_file(store: Store, rel: str, local: Path, size: int, mtime_ns: int | None) -> None:
    if local.is_file():
        st = local.stat()
        if st.st_size == size and (mtime_ns is None or st.st_mtime_ns == mtime_ns):
            return
    store.download_file(rel, local)
    if mtime_ns is not None:
        os.utime(local, ns=(mtime_ns, mtime_ns))


def fetch_input(uri: str) -> Path:
    """A node-local copy of an input file, or of every file under a prefix, at ``uri``. A file is downloaded again
    only when its size or modification time at the URI changed, and its local mtime is set to the remote one, so
    prepared-data cache keys (path, size, mtime) stay put from run to run. FileNotFoundError when nothing is
    there."""
    import pyarrow.fs as pafs

    check_uri(uri, "input")
    store, rel = store_and_rel(uri)
    local = local_path_for(uri)
    info = store.info(rel)
    if info.type == pafs.FileType.File:
        _sync_file(store, rel, local, int(info.size), info.mtime_ns)
        return local
    sel = pafs.FileSelector(store._p(rel), recursive=True, allow_not_found=True)
    base = store._p(rel).rstrip("/") + "/"
    found = [i for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.startswith(base)]
    if not found:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    with file_lock(local.parent / f".{local.name}.fetch-lock"):
        names = set()
        for i in found:
            name = i.path[len(base):]
            names.add(name)
            _sync_file(store, f"{rel}/{name}", local / name, int(i.size), i.mtime_ns)
        for p in [p for p in local.rglob("*") if p.is_file()]:  # deleted at the URI: gone here too
            if p.relative_to(local).as_posix() not in names and not p.name.startswith("."):
                p.unlink()
    return local
