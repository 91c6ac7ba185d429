"""A lease on a run directory in a bucket, so that two kcpt drivers on *different machines* do not write one run
(or one tune experiment: :func:`held` holds either, on this machine and across machines).

A local lock file (:func:`kcpt.storage.file_lock`) tells apart the processes of one machine only. For a run
directory at a URI, the holder also keeps one small object beside its files, ``kcpt-lease.json``:
``{"host", "pid", "token", "ttl_s"}``, rewritten every ``ttl_s / 4`` seconds (a heartbeat) and deleted at the end.

- Taking it: absent, or *stale* (not rewritten for ``ttl_s`` by the store's own clock — its objects' modification
  times — or its holder a dead process of this host), it is written, and read back after :data:`SETTLE_S`: the
  writer whose token is there holds it. Object stores read back what was last written (S3 and GCS are strongly
  consistent), so of two drivers that write within the settle time only one goes on. pyarrow's filesystems offer
  no conditional write, so two that start further apart but each read "absent" before the other wrote are
  the one race left; the heartbeat of the one that lost then says so loudly.
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


def read_holder(store: Store, *, aged: bool = True) -> Holder | None:
    """The lease's holder, or None when there is none (or it is unreadable: taken as absent). ``aged=False``: who
    holds it, without its age (``age_s`` 0; the store's clock costs a write, a stat and a delete)."""
    info = store.info(LEASE)
    if info.mtime is None:
        return None
    try:
        d: dict[str, Any] = json.loads(store.read_text(LEASE))
    except (OSError, ValueError):
        return None
    age = max(0.0, _now_by_store(store) - info.mtime.timestamp()) if aged else 0.0
    return Holder(str(d.get("host", "?")), int(d.get("pid", 0)), age, str(d.get("token", "")),
                  float(d.get("ttl_s", TTL_S)))


@contextmanager
def bucket_lease(store: Store, *, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``store``'s lease for this process (see the module docstring); :class:`LeaseHeld` when another holds it
    (with ``wait``: wait for it, ``on_wait(message)`` first)."""
    ttl = ttl_s()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "ttl_s": ttl}
    text = json.dumps(me)
    told = False
    while True:
        holder = read_holder(store)
        if holder is None or holder.stale():
            store.write_text(LEASE, text)
            time.sleep(SETTLE_S)
            got = read_holder(store, aged=False)
            if got is not None and got.token == me["token"]:
                if holder is not None:
                    log.warning("%s: took over the lease of a kcpt run that is gone (%s)", store.uri, holder)
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
        while not stop.wait(ttl / 4):
            try:
                now = read_holder(store, aged=False)
                if now is not None and now.token != me["token"]:
                    log.error("%s: another kcpt run took this run's lease (%s): two drivers write this run; stop "
                              "one of them", store.uri, now)
                    return
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
            now = read_holder(store, aged=False)
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
