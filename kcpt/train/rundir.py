"""The run directory: everything a run leaves behind, readable without Ray.

```
<output_dir>/<run_name>/
  config.yaml        the resolved config
  metrics.jsonl      one JSON object per eval (see kcpt.train.loop.METRIC_KEYS), appended by rank 0
  summary.json       {"stages": {name: summary}, "baseline_raw_best": ..., "stage_order": [...]}
  checkpoints/       kcpt checkpoints (HF safetensors + tokenizer + trainer state + manifest)
  tb/<stage>/        TensorBoard scalars
  ray/               Ray Train storage (its own small pointer checkpoints and state)
  faults/            markers of injected faults that already fired
  aborted.json       only after a deterministic abort (e.g. too many anomaly rollbacks): {"message": ...}
  forgetting.json    the forgetting / drift report (``kcpt report RUN --forgetting``; + forgetting.parquet)
  kcpt-run.json      the marker that kcpt made this directory (written first, never removed)
```

``output_dir`` may be a local path, a shared-FS path or a URI (``s3://bucket/runs``; :mod:`kcpt.storage`). For a
URI, :class:`RunDir` works in a node-local mirror (``root``) and publishes every file it writes to the URI
(``location``): small files whole on each write, checkpoints file by file with ``manifest.json`` last (a reader
never takes a half-uploaded checkpoint as complete); :meth:`RunDir.pull` refreshes the mirror from the URI.

Safety: kcpt writes into (and, when a run starts over, deletes the entries above from) a directory only when it
is absent, empty, or holds the marker — never a directory it did not create (:meth:`RunDir.check_owned`).
Starting over removes only the entries listed above, and only after the run was validated.

No silent destruction: a run directory that :meth:`RunDir.has_results` (a checkpoint, ``summary.json`` or an
eval record in ``metrics.jsonl``) is continued (``--resume``) or replaced (``--overwrite``) only when asked;
otherwise :meth:`RunDir.refuse_existing` stops the run before anything is touched. A directory that holds no
results yet (only the marker/config, Ray state, fault markers of a run that died before its first eval) is
started over without asking: nothing a user could want is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kcpt import storage
from kcpt.config import KcptConfig, dump_config
from kcpt.errors import InputError
from kcpt.lease import LEASE, held

MARKER = "kcpt-run.json"
OWNED_ENTRIES = ("metrics.jsonl", "summary.json", "checkpoints", "tb", "ray", "faults", "aborted.json",
                 "forgetting.json", "forgetting.parquet", "eval")
"""What starting a run over removes (nothing else in the run directory is ever deleted)."""

log = logging.getLogger(__name__)


def run_dir_for(cfg: KcptConfig) -> str:
    """``<output_dir>/<run_name>`` (a URI or a local path string)."""
    return storage.join(cfg.train.output_dir, cfg.train.run_name)


def _clean(v: Any) -> Any:
    """JSON-safe value: non-finite floats become None, numpy/torch scalars become Python numbers."""
    if hasattr(v, "item") and not isinstance(v, list | dict | str):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def run_dir_of(cfg: KcptConfig, run_dir: str | Path | None = None) -> RunDir:
    """The run directory a run of ``cfg`` uses: ``run_dir``, else ``<train.output_dir>/<train.run_name>``; a URI
    stays one, a local path is made absolute."""
    ref = str(run_dir) if run_dir is not None else str(run_dir_for(cfg))
    return RunDir(ref if storage.is_uri(ref) else storage.local_path(ref))


def _delete_tree(path: Path) -> int:
    """Delete the directory ``path`` and return the bytes it held (0 when absent). Safe for several processes of one
    node at once: it is renamed to a hidden name first, and only the process whose rename won deletes it."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.rename(path, doomed)
    except (FileNotFoundError, NotADirectoryError):  # nothing here, or another process took it
        return 0
    freed = sum(p.stat().st_size for p in doomed.rglob("*") if p.is_file())
    shutil.rmtree(doomed, ignore_errors=True)
    return freed



class RunDir:
    """Paths and writers of one run directory (writers are used by rank 0 only)."""

    def __init__(self, root: str | Path) -> None:
        ref = str(root)
        self.remote: storage.Store | None = None
        if storage.is_uri(ref):
            self.location = ref.rstrip("/")
            self.remote = storage.Store(self.location)
            self.root = storage.local_path_for(self.location)
        else:
            self.root = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
            self.location = str(self.root)
        self._uploader: Any = None
        self._uploads: list[Any] = []

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    # ----------------------------------------------------------------- remote mirror
    def _push(self, rel: str) -> None:
        """Publish the mirror's file ``rel`` to the URI (no-op for a local run directory)."""
        if self.remote is not None:
            self.remote.upload_file(self.root / rel, rel)

    def pull(self) -> RunDir:
        """Refresh the mirror's run files (metrics, summary, config, marker, fault markers) from the URI."""
        if self.remote is None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        for rel in ("metrics.jsonl", "summary.json", "config.yaml", MARKER, "aborted.json"):
            local = self.root / rel
            if self.remote.is_file(rel):
                self.remote.download_file(rel, local)
            else:
                local.unlink(missing_ok=True)
        shutil.rmtree(self.faults, ignore_errors=True)
        for name in self.remote.walk("faults"):
            self.remote.download_file(f"faults/{name}", self.faults / name)
        return self

    def push_tree(self, rel: str) -> None:
        """Publish every file under the mirror's ``rel`` (e.g. ``tb/<stage>``)."""
        if self.remote is not None and (self.root / rel).is_dir():
            self.remote.upload_tree(self.root / rel, rel)

    def checkpoint_ref(self, name: str) -> str:
        """What a checkpoint is called in summaries and metrics: its URI, or its local path."""
        return storage.join(self.location, "checkpoints", name) if self.remote is not None \
            else str(self.checkpoints / name)

    def publish_checkpoint(self, name: str, keep_remote: set[str] = frozenset(), *, background: bool = False
                           ) -> None:
        """Upload the mirror's complete checkpoint ``name`` (manifest last; ``keep_remote``: files other ranks
        uploaded themselves). ``background``: in this process's upload thread, so training goes on while it
        uploads (one upload at a time, in order); :meth:`wait_published` joins it and re-raises its error."""
        if self.remote is None:
            return
        from kcpt.train.checkpoint import MANIFEST

        def upload() -> None:
            storage.publish_tree(self.checkpoints / name, self.checkpoint_ref(name), marker=MANIFEST,
                                 keep=keep_remote)

        if not background:
            self.wait_published()
            upload()
            return
        self._submit(upload)

    def _submit(self, job: Any) -> None:
        if self._uploader is None:
            from concurrent.futures import ThreadPoolExecutor

            self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kcpt-checkpoint")
        self._uploads.append(self._uploader.submit(job))

    def write_checkpoint_async(self, name: str, write: Any, keep_remote: set[str] = frozenset()) -> None:
        """Run ``write()`` (which writes the mirror's checkpoint ``name`` atomically: temp dir, fsync, read-back,
        rename, manifest last), then its upload to the URI, in this process's background thread — one job at a
        time, in order. :meth:`wait_published` joins it; any failure is raised there as a
        :class:`~kcpt.errors.CheckpointError` naming the checkpoint (the previous checkpoints are untouched: a
        failed write leaves no visible directory)."""
        ref = self.checkpoint_ref(name)

        def job() -> None:
            from kcpt.errors import CheckpointError
            from kcpt.train.checkpoint import MANIFEST

            try:
                write()
                if self.remote is not None:
                    storage.publish_tree(self.checkpoints / name, ref, marker=MANIFEST, keep=keep_remote)
            except Exception as e:  # noqa: BLE001 - OSError, torch/safetensors errors, ...: reported with the path
                detail = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
                raise CheckpointError(f"asynchronous checkpoint write of {ref} failed: {detail}. The run's earlier "
                                      "checkpoints are intact: check the free space and the file-size limit (ulimit "
                                      f"-f) where it writes ({self.location}), then run the same command with "
                                      "--resume") from e

        self._submit(job)

    def wait_published(self) -> None:
        """Block until every background checkpoint write and upload is done; the first failure is raised here
        (a :class:`~kcpt.errors.CheckpointError` naming the checkpoint for :meth:`write_checkpoint_async`)."""
        pending, self._uploads = self._uploads, []
        errors = [e for f in pending if (e := f.exception()) is not None]  # every job has ended before any raise
        if errors:
            raise errors[0]

    def retract_checkpoint(self, name: str) -> None:
        self.wait_published()
        if self.remote is not None:
            from kcpt.train.checkpoint import MANIFEST

            storage.retract_tree(self.checkpoint_ref(name), marker=MANIFEST)

    def remote_checkpoints(self) -> list[str]:
        """Names of the published (manifest present) checkpoints at the URI."""
        if self.remote is None:
            return []
        from kcpt.train.checkpoint import MANIFEST

        return [n for n in self.remote.listdir("checkpoints")
                if not n.startswith(".") and self.remote.is_file(f"checkpoints/{n}/{MANIFEST}")]

    def prune_checkpoints(self, keep_last: int, keep: list[str]) -> None:
        """:func:`kcpt.train.checkpoint.prune_checkpoints` on the mirror, and the same rule at the URI (order by
        the (stage position, step) in the names; ``keep`` holds checkpoint refs)."""
        from kcpt.train import checkpoint as ckpt_lib

        self.wait_published()  # never delete a mirror copy an upload still reads
        if self.remote is None:
            ckpt_lib.prune_checkpoints(self.checkpoints, keep_last, keep=[k for k in keep if not storage.is_uri(k)])
            return
        prefix = self.location + "/checkpoints/"
        kept = {k[len(prefix):] for k in keep if k.startswith(prefix)}
        ckpt_lib.prune_checkpoints(self.checkpoints, keep_last, keep=[self.checkpoints / n for n in kept])
        names = sorted((k, n) for n in self.remote_checkpoints() if (k := _name_key(n)) is not None)
        last = {n for _, n in names[-keep_last:]} if keep_last > 0 else set()
        for _, n in names:
            if n not in last and n not in kept:
                self.retract_checkpoint(n)

    def drop_local_checkpoints(self) -> int:
        """At a URI: delete this node's copies of the run's checkpoints once they are published (the URI holds
        them; a later resume or fetch downloads what it needs) and return the bytes freed. Without this, every
        run or tune trial on a node would leave its kept checkpoints (weights and optimizer state) in the node's
        scratch for good. A local run directory keeps its checkpoints (returns 0). Safe for several processes of
        one node at once: the directory is renamed to a hidden name before it is deleted."""
        if self.remote is None:
            return 0
        self.wait_published()
        return _delete_tree(self.checkpoints)

    def drop_stale_node_copies(self) -> int:
        """At a URI, inside a Ray worker: delete this machine's mirrors of the run kept under the scratch keys of
        Ray nodes that are gone (a killed run's node: its checkpoints were never freed, and a new Ray session has
        new node ids, so nothing else would ever reuse or delete them). Returns the bytes freed. The run's own
        copies on live nodes are untouched (two nodes of one cluster may share a machine)."""
        if self.remote is None:
            return 0
        alive = storage.live_node_keys()
        if alive is None:
            return 0
        here = storage.scratch_root()
        rel = self.root.relative_to(here)
        return sum(_delete_tree(other / rel) for other in sorted(here.parent.glob("node-*")) if other.name not in alive)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def ray_storage_location(self) -> str:
        """``RunConfig(storage_path=...)``: ``<location>/ray`` (Ray Train writes a URI through pyarrow.fs)."""
        return storage.join(self.location, "ray")

    @property
    def faults(self) -> Path:
        return self.root / "faults"

    @property
    def aborted_path(self) -> Path:
        return self.root / "aborted.json"

    def write_aborted(self, message: str) -> None:
        self.aborted_path.write_text(json.dumps({"message": message}, ensure_ascii=False), encoding="utf-8")
        self._push("aborted.json")

    def clear_aborted(self) -> None:
        self.aborted_path.unlink(missing_ok=True)
        if self.remote is not None:
            self.remote.delete("aborted.json")

    def read_aborted(self) -> str | None:
        """The message of a deterministic abort of the last attempt, or None (reads the URI's copy)."""
        if self.remote is not None:
            if not self.remote.is_file("aborted.json"):
                return None
            self.remote.download_file("aborted.json", self.aborted_path)
        elif not self.aborted_path.is_file():
            return None
        return json.loads(self.aborted_path.read_text(encoding="utf-8"))["message"]

    @property
    def marker_path(self) -> Path:
        return self.root / MARKER

    def check_owned(self) -> None:
        """InputError unless the run directory is absent, an empty directory, or marked as kcpt's own."""
        if self.remote is not None:
            if [n for n in self.remote.listdir() if LEASE not in n] and not self.remote.is_file(MARKER):
                raise InputError(f"exists but kcpt did not create it (no {MARKER}); kcpt writes and deletes only in "
                                 "its own run directories: choose another train.run_name / --run-dir",
                                 path=self.location)
            return
        root = self.root
        if not root.exists() and not root.is_symlink():
            return
        if not root.is_dir():
            raise InputError("run directory exists and is not a directory; choose another run name or --run-dir",
                             path=str(root))
        if self.marker_path.is_file():
            return
        try:
            empty = next(root.iterdir(), None) is None
        except OSError as e:
            raise InputError(f"cannot read run directory: {e.strerror}", path=str(root)) from None
        if not empty:
            raise InputError(f"exists but kcpt did not create it (no {MARKER}); kcpt writes and deletes only in "
                             "its own run directories: choose another train.run_name / --run-dir, or move it away",
                             path=str(root))

    @contextlib.contextmanager
    def in_use(self, *, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the run directory for this process (a lock file in this machine's temp dir, named by the directory's
        absolute path, that holds the pid; nothing is created beside the run before it is validated): a second kcpt
        run into the same local directory would interleave its metrics and checkpoints with this one's.
        Another process's hold is an :class:`InputError` naming its pid, or with ``wait`` is waited for
        (``on_wait(message)`` first). Re-entrant within a process. A URI run directory is held across machines as
        well, by a lease object beside its files (:func:`kcpt.lease.bucket_lease`)."""
        key = str(self.root.resolve()) if self.remote is None else self.location
        with held(key, self.remote, what="run", elsewhere="choose another run name / run directory", wait=wait,
                  on_wait=on_wait, shown=self.location):
            yield

    def has_results(self) -> bool:
        """True if the directory holds anything of a previous run worth keeping: a visible checkpoint,
        ``summary.json`` or a non-empty ``metrics.jsonl`` (reads no file contents)."""
        if self.remote is not None:
            info = self.remote.walk("")
            return "summary.json" in info or info.get("metrics.jsonl", 0) > 0 or bool(self.remote_checkpoints())
        if self.summary_path.is_file():
            return True
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0:
            return True
        return self.checkpoints.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                                                 for p in self.checkpoints.iterdir())

    def refuse_existing(self) -> None:
        """InputError (one line naming ``--resume`` and ``--overwrite``) if the directory :meth:`has_results`."""
        if (self.remote is not None or self.root.is_dir()) and self.has_results():
            raise InputError("this run name already has results; pass --resume to continue it or --overwrite to "
                             "replace it (or choose another --run-name)", path=self.location)

    def start_over(self, protect: list[Path] = ()) -> None:
        """Delete the previous results (:data:`OWNED_ENTRIES` only) of an owned run directory, refusing if any
        path in ``protect`` (the run's inputs) is inside one of them."""
        self.check_owned()
        if self.remote is not None:
            for name in self.remote_checkpoints():
                self.retract_checkpoint(name)
            for n in OWNED_ENTRIES:
                self.remote.delete(n)
                self.remote.delete_tree(n)
            shutil.rmtree(self.root, ignore_errors=True)
            return
        if not self.root.is_dir():
            return
        doomed = [self.root / n for n in OWNED_ENTRIES]
        for p in protect:
            rp = Path(p).resolve()
            for d in doomed:
                rd = d.resolve()
                if rp == rd or rd in rp.parents:
                    raise InputError(f"input {p} lies inside {d}, which starting the run over would delete; move "
                                     "the input or choose another run directory", path=str(self.root))
        for d in doomed:
            if d.is_symlink() or d.is_file():
                d.unlink()
            elif d.is_dir():
                shutil.rmtree(d)

    def create(self, cfg: KcptConfig) -> RunDir:
        """Create (or reuse, when owned) the run directory, mark it as kcpt's and write ``config.yaml``."""
        self.check_owned()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self.marker_path.is_file():
                from kcpt import __version__

                self.marker_path.write_text(json.dumps({"kcpt_version": __version__, "kind": "run"}) + "\n",
                                            encoding="utf-8")
            self.checkpoints.mkdir(exist_ok=True)
            dump_config(cfg, self.config_path)
            if self.remote is not None:
                if not self.remote.is_file(MARKER):
                    self._push(MARKER)
                self._push("config.yaml")
        except OSError as e:
            raise InputError(f"cannot create run directory: {e.strerror or e}", path=str(e.filename or self.root)
                             ) from None
        return self

    def recorded_config(self) -> str | None:
        """The text of the run's ``config.yaml`` (the config the run last started with; at a URI the published
        one), or None when there is none."""
        try:
            if self.remote is not None:
                return self.remote.read_text("config.yaml") if self.remote.is_file("config.yaml") else None
            return self.config_path.read_text(encoding="utf-8") if self.config_path.is_file() else None
        except (OSError, UnicodeDecodeError):
            return None

    def restore_config(self, text: str) -> None:
        """Write ``text`` back as ``config.yaml`` (a refused start leaves the run's record as it found it)."""
        self.config_path.write_text(text, encoding="utf-8")
        self._push("config.yaml")

    def latest_checkpoint(self, stages: list[str]) -> str | None:
        """The ref (path or URI) of the most advanced checkpoint of a run of ``stages`` (by stage position, then
        step), or None. Visible local checkpoint directories are complete (written under a hidden name and
        renamed; pruned ones are hidden before they are deleted); at a URI only those whose manifest (uploaded
        last, retracted first) is present count."""
        names = self.checkpoint_names(stages)
        return self.checkpoint_ref(names[-1]) if names else None

    def checkpoint_names(self, stages: list[str]) -> list[str]:
        """The names of the checkpoints of a run of ``stages`` (see :meth:`latest_checkpoint`), oldest first."""
        if self.remote is not None:
            names = self.remote_checkpoints()
        elif self.checkpoints.is_dir():
            names = [p.name for p in self.checkpoints.iterdir() if p.is_dir() and not p.name.startswith(".")]
        else:
            return []
        found = []
        for n in names:
            parsed = _parse_name(n)
            if parsed is not None and parsed[0] < len(stages) and stages[parsed[0]] == parsed[1]:
                found.append(((parsed[0], parsed[2]), n))
        return [n for _, n in sorted(found)]

    # ----------------------------------------------------------------- metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        _drop_torn_tail(self.metrics_path)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._push("metrics.jsonl")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.root)

    def truncate_metrics(self, keep: Any, rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                         ) -> None:
        """Rewrite metrics.jsonl keeping the records for which ``keep(record)`` is true (used on resume, so
        evals repeated after a restart are not recorded twice), each passed through ``rewrite`` when given."""
        if not self.metrics_path.exists():
            return
        kept = [rewrite(r) if rewrite is not None else r for r in self.read_metrics() if keep(r)]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)
        self._push("metrics.jsonl")

    # ----------------------------------------------------------------- summary
    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.exists():
            return {"stages": {}, "stage_order": [], "baseline_raw_best": None}
        try:
            summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InputError(f"not valid JSON ({e}); remove or restore the file", path=str(self.summary_path)
                             ) from None
        if not isinstance(summary, dict) or not isinstance(summary.get("stages", {}), dict):
            raise InputError("not a kcpt summary (expected an object with 'stages')", path=str(self.summary_path))
        return summary

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(summary), indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.summary_path)
        self._push("summary.json")

    # ----------------------------------------------------------------- fault markers (tests)
    def marker_exists(self, name: str) -> bool:
        if self.remote is not None:
            return self.remote.is_file(f"faults/{name}")
        return (self.faults / name).exists()

    def marker_append(self, name: str, line: str = "fired") -> None:
        """Append ``line`` to ``faults/<name>`` (read-modify-write at a URI: one writer, rank 0 or the crashing
        rank)."""
        self.faults.mkdir(parents=True, exist_ok=True)
        if self.remote is not None and self.remote.is_file(f"faults/{name}"):
            self.remote.download_file(f"faults/{name}", self.faults / name)
        with open(self.faults / name, "a") as f:
            f.write(line + "\n")
        self._push(f"faults/{name}")


def _parse_name(n: str) -> tuple[int, str, int] | None:
    """``NN-<stage>-stepNNNNNN`` → (stage position, stage, step), else None."""
    try:
        pos_s, rest = n.split("-", 1)
        name, step_s = rest.rsplit("-step", 1)
        if not pos_s.isdigit():
            return None
        return int(pos_s), name, int(step_s)
    except ValueError:
        return None


def _name_key(n: str) -> tuple[int, int] | None:
    p = _parse_name(n)
    return (p[0], p[2]) if p else None


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that lacks its newline (a write cut short by a kill) so the next record starts clean."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
    except FileNotFoundError:
        return


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The eval records of a run (one dict per line of metrics.jsonl).

    A last line without its newline that is not valid JSON is a write cut short by a kill and is ignored; any
    other bad line is an InputError naming the file and the line."""
    if storage.is_uri(str(run_dir)):
        run_dir = RunDir(str(run_dir)).pull().root
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 ({e.reason}); remove or restore the file", path=str(path)) from None
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            if i == len(lines):  # no newline after it: a torn final write
                log.warning("%s: line %d is cut short (a write stopped by a kill?) and is left out", path, i)
                continue
            raise InputError(f"not valid JSON ({e}); remove or fix the line", path=str(path), line=i) from None
        if not isinstance(rec, dict):
            raise InputError("not a JSON object; remove or fix the line", path=str(path), line=i)
        out.append(rec)
    return out


class ScalarLogger:
    """TensorBoard scalars of one stage under ``tb/<stage>/`` (rank 0). ``purge_step`` drops events a previous
    attempt wrote at or after that step (resume after a failure)."""

    def __init__(self, run_dir: RunDir, stage: str, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        self.run_dir, self.rel = run_dir, f"tb/{stage}"
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir.tb / stage), purge_step=purge_step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                continue
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.run_dir.push_tree(self.rel)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.run_dir.push_tree(self.rel)
