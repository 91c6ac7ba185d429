"""A lease on a run directory in a bucket, so that two kcpt drivers on *different machines* do not write one run
(or one tune experiment: :func:`held` holds either, on this machine and across machines).

A local lock file (:func:`kcpt.storage.file_lock`) tells apart the processes of one machine only. For a run
directory at a URI, the holder also keeps one small object beside its files, ``kcpt-lease.json``:
``{"host", "pid", "token", "ttl_s"}``, rewritten every ``ttl_s / 4`` seconds (a heartbeat) and deleted at the end.

- Taking it: absent, or *stale* (not rewritten for ``ttl_s`` by the store's own clock — its objects' modification
  times — or its holder a dead process of this host), it is written, and read back after :data:`SETTLE_S`: the
  writer whose token is there holds it. Object stores read back what was last written (S3 and GCS are strongly
  consistent), so of two drivers that write within the settle time only one goes on.
- On ``s3://`` the writes are conditional (:class:`Conditional`: PutObject with ``If-None-Match: *`` where the
  lease was absent, ``If-Match: <ETag>`` of the stale lease that was read, and of its own last write for a
  heartbeat), so of two drivers that each read "absent" or "stale" only one write succeeds, however far apart
  they started, and a heartbeat never overwrites a lease another driver took. pyarrow's filesystems have no
  conditional write, so this goes through boto3 (the same ``AWS_*`` settings); a server that answers
  NotImplemented gets the plain writes, and GCS has only those: there, two drivers that start further apart than
  the settle time but each read "absent" before the other wrote are the race left (the heartbeat of the one that
  lost then says so loudly).
- Held by another: :class:`LeaseHeld` names its host, pid and the seconds since its last heartbeat.

``KCPT_LEASE_TTL_S`` sets ``ttl_s`` (default :data:`TTL_S`): a driver killed with SIGKILL on another machine frees
its run after that long.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kcpt import storage
from kcpt.errors import InputError
from kcpt.storage import Store

LEASE = "kcpt-lease.json"
TTL_S = 60.0
SETTLE_S = 0.2

log = logging.getLogger(__name__)


def ttl_s() -> float:
    return float(os.environ.get("KCPT_LEASE_TTL_S") or TTL_S)


@dataclass
class Holder:
    host: str
    pid: int
    age_s: float
    """Seconds since the holder last wrote the lease (by the store's clock)."""
    token: str
    ttl_s: float
    etag: str | None = None
    """The version read (``s3://``: for a conditional replace)."""

    def stale(self) -> bool:
        return self.age_s > self.ttl_s or (self.host == socket.gethostname() and not _alive(self.pid))

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, last heartbeat {self.age_s:.0f} s ago"


class LeaseHeld(Exception):
    def __init__(self, holder: Holder) -> None:
        super().__init__(str(holder))
        self.holder = holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now_by_store(store: Store) -> float:
    """The store's clock: the modification time of an object written just now (no clock skew with the holder)."""
    probe = f".{LEASE}.clock-{uuid.uuid4().hex[:8]}"
    store.write_bytes(probe, b"")
    try:
        return store.info(probe).mtime.timestamp()
    finally:
        store.delete(probe)


class Conditional:
    """Conditional writes of an ``s3://`` store's lease object (S3's PutObject preconditions, through boto3; the
    endpoint and credentials from the standard ``AWS_*`` variables, as pyarrow's). :meth:`of` is None where there
    are none (another scheme; boto3 absent)."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.supported = True
        """False once the server answered NotImplemented: plain writes from then on."""

    @classmethod
    def of(cls, store: Store) -> Conditional | None:
        if not store.uri.startswith("s3://"):
            return None
        try:
            import boto3
        except ImportError:
            return None
        bucket, _, prefix = store.base.partition("/")
        return cls(boto3.client("s3"), bucket, f"{prefix}/{LEASE}" if prefix else LEASE)

    def read(self) -> tuple[bytes, float, str] | None:
        """``(content, modification time, ETag)`` of the lease, read at once; None when absent."""
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return r["Body"].read(), r["LastModified"].timestamp(), r["ETag"]

    def put(self, text: str, *, replacing: str | None) -> str | None:
        """Write the lease if it is still as read — absent (``replacing`` None) or the version whose ETag is
        ``replacing`` — and return the new ETag; None when another writer came first."""
        from botocore.exceptions import ClientError

        cond = {"IfMatch": replacing} if replacing is not None else {"IfNoneMatch": "*"}
        try:
            return str(self.client.put_object(Bucket=self.bucket, Key=self.key, Body=text.encode(), **cond)["ETag"])
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if code == "NotImplemented":
                log.warning("s3://%s: this S3 server has no conditional writes; the lease is written plainly",
                            self.bucket)
                self.supported = False
                return str(self.client.put_object(Bucket=self.bucket, Key=self.key, Body=text.encode())["ETag"])
            raise


def _holder(d: dict[str, Any], age: float, etag: str | None) -> Holder:
    return Holder(str(d.get("host", "?")), int(d.get("pid", 0)), age, str(d.get("token", "")),
                  float(d.get("ttl_s", TTL_S)), etag)


def read_holder(store: Store, *, aged: bool = True, cond: Conditional | None = None) -> Holder | None:
    """The lease's holder, or None when there is none (or it is unreadable: taken as absent; with ``cond``, an
    unreadable one is a stale holder, so that it is replaced conditionally). ``aged=False``: who holds it, without
    its age (``age_s`` 0; the store's clock costs a write, a stat and a delete). With ``cond`` the content and its
    ETag are read at once."""
    if cond is not None:
        got = cond.read()
        if got is None:
            return None
        body, mtime, etag = got
        age = max(0.0, _now_by_store(store) - mtime) if aged else 0.0
        try:
            return _holder(json.loads(body), age, etag)
        except ValueError:
            return Holder("?", 0, float("inf"), "", 0.0, etag)
    info = store.info(LEASE)
    if info.mtime is None:
        return None
    try:
        d: dict[str, Any] = json.loads(store.read_text(LEASE))
    except (OSError, ValueError):
        return None
    age = max(0.0, _now_by_store(store) - info.mtime.timestamp()) if aged else 0.0
    return _holder(d, age, None)


@contextmanager
def bucket_lease(store: Store, *, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``store``'s lease for this process (see the module docstring); :class:`LeaseHeld` when another holds it
    (with ``wait``: wait for it, ``on_wait(message)`` first)."""
    ttl = ttl_s()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "ttl_s": ttl}
    text = json.dumps(me)
    cond = Conditional.of(store)
    mine: str | None = None
    """The ETag of this driver's last write (conditional writes)."""
    told = False
    while True:
        holder = read_holder(store, cond=cond)
        if holder is None or holder.stale():
            if cond is not None and cond.supported:
                mine = cond.put(text, replacing=holder.etag if holder is not None else None)
                if mine is None:  # another driver wrote it since it was read: read who
                    continue
            else:
                store.write_text(LEASE, text)
            time.sleep(SETTLE_S)
            got = read_holder(store, aged=False, cond=cond)
            if got is not None and got.token == me["token"]:
                if holder is not None:
                    log.warning("%s: took over the lease of a kcpt run that is gone (%s)", store.uri, holder)
                mine = got.etag
                break
            holder = got or holder
        if holder is None:
            continue
        if not wait:
            raise LeaseHeld(holder)
        if on_wait is not None and not told:
            on_wait(f"in use by another kcpt run ({holder}); waiting for it to end")
            told = True
        time.sleep(min(5.0, ttl / 4))
    stop = threading.Event()

    def beat() -> None:
        nonlocal mine
        while not stop.wait(ttl / 4):
            try:
                now = read_holder(store, aged=False, cond=cond)
                if now is not None and now.token != me["token"]:
                    log.error("%s: another kcpt run took this run's lease (%s): two drivers write this run; stop "
                              "one of them", store.uri, now)
                    return
                if cond is not None and cond.supported:
                    tag = cond.put(text, replacing=mine)
                    if tag is None:  # taken between the read and the write
                        continue  # the next beat reads and names who
                    mine = tag
                else:
                    store.write_text(LEASE, text)
            except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried at the next beat
                log.warning("%s: lease heartbeat failed (%s); retrying", store.uri, e)

    thread = threading.Thread(target=beat, name="kcpt-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            now = read_holder(store, aged=False, cond=cond)
            if now is not None and now.token == me["token"]:
                store.delete(LEASE)
        except Exception as e:  # noqa: BLE001 - the lease then expires after its ttl
            log.warning("%s: could not remove the lease (%s); it expires in %.0f s", store.uri, e, ttl)


_HELD: set[str] = set()
"""The locations this process holds (:func:`held`)."""


@contextmanager
def held(location: str, remote: Store | None, *, what: str, elsewhere: str, wait: bool = False,
         on_wait: Callable[[str], None] | None = None, shown: str | None = None) -> Iterator[None]:
    """Hold ``location`` (a run directory, a tune experiment; an absolute path or a URI) for this process: a lock file
    in this machine's temp dir, named by ``location``, that holds the pid, and for a URI (``remote``, its store) the
    bucket lease beside its files. Another process's hold is an :class:`InputError` naming it — ``"in use by another
    kcpt <what> (…): wait for it to end, or <elsewhere>"`` — or with ``wait`` is waited for (``on_wait(message)``
    first); messages name ``shown`` (default ``location``). Re-entrant within a process. Nothing is created beside
    ``location`` but the lease."""
    shown = shown or location
    if location in _HELD:
        yield
        return
    lock = Path(tempfile.gettempdir(), f"kcpt-run-locks-{os.getuid()}",
                f"{hashlib.sha256(location.encode()).hexdigest()[:24]}.lock")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(storage.file_lock(lock, blocking=False))
        except BlockingIOError:
            holder = lock.read_text(encoding="utf-8").strip() or "?"
            msg = f"in use by another kcpt {what} (pid {holder}) on this machine"
            if not wait:
                raise InputError(f"{msg}: wait for it to end, or {elsewhere}", path=shown) from None
            if on_wait is not None:
                on_wait(f"{shown}: {msg}; waiting for it to end")
            stack.enter_context(storage.file_lock(lock))
        if remote is not None:
            try:
                stack.enter_context(bucket_lease(remote, wait=wait, on_wait=on_wait and (
                    lambda msg: on_wait(f"{shown}: {msg}"))))
            except LeaseHeld as e:
                h = e.holder
                raise InputError(f"in use by another kcpt {what} ({h}): wait for it to end, or {elsewhere} (if "
                                 f"that {what} is gone, its lease {LEASE} expires {max(0.0, h.ttl_s - h.age_s):.0f} "
                                 "s from now)", path=shown) from None
        _HELD.add(location)
        try:
            lock.write_text(f"{os.getpid()}\n", encoding="utf-8")
            yield
        finally:
            _HELD.discard(location)
