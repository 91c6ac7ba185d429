"""Checkpoints: one directory each, written atomically, bound to the run's tokenizer, data and config.

Layout of ``<path>/``:

- the HF model (``save_pretrained``: ``config.json``, ``generation_config.json``, ``model*.safetensors``) and
  the tokenizer (``tokenizer.json``, ...) side by side, so ``from_pretrained(path)`` loads either;
- ``trainer_state.pt``: ``torch.save`` of the trainer state (optimizer, scheduler, RNG, data cursors, mixture,
  stop and anomaly state, ...) restricted to tensors and primitive containers, so that
  :func:`load_trainer_state` can use ``torch.load(weights_only=True)``; numpy values and paths are converted
  on save (see :func:`to_safe_state`) and the file is read back once before the checkpoint is published;
- ``manifest.json``: :func:`build_manifest`'s dict + ``files`` (name → size) + ``"complete": true``, written last.

Atomicity: everything is written into a hidden temp dir beside ``path`` (``.<name>.tmp-<pid>-<rand>``, same
filesystem), fsynced, then renamed to ``path``. A kill at any moment leaves either the complete new checkpoint
or no directory named ``path``; other checkpoints are never touched. Re-saving onto an existing ``path`` moves
the old one aside first (``.<name>.old-<pid>``), renames the new one in, then deletes the old one. Deleting
(pruning) renames a checkpoint to a hidden name before removing it, so a half-deleted one is never listed.
Leftover hidden dirs of dead saves are removed by :func:`prune_checkpoints` and :func:`remove_stale_temps`.

Asynchronous saves (``train.async_checkpoint``): :class:`HostSnapshot` copies the state to host memory on the
training thread; :func:`save_checkpoint` then runs in a writer thread on that copy (:func:`state_dict_saver`
for the weights), with the same atomicity.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kcpt
from kcpt import storage
from kcpt.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
ENGINE_DIR = "engine"
"""Sub-directory of a kcpt checkpoint holding the engine's full state (optimizer; DeepSpeed partitions)."""
FORMAT_VERSION = 1
_HIDDEN_MARKERS = (".tmp-", ".old-", ".del-")


# --------------------------------------------------------------------------- state conversion


def to_safe_state(obj: Any, where: str = "trainer_state") -> Any:
    """Copy of ``obj`` that ``torch.load(weights_only=True)`` accepts: numpy arrays → tensors, numpy scalars →
    Python numbers, paths → str, mappings → dict. Raises :class:`CheckpointError` naming the key path of
    anything else that is not a tensor, str, int, float, bool, None, list, tuple or dict."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored; use str/int")
            out[k] = to_safe_state(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list):
        return [to_safe_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(to_safe_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot be stored in {TRAINER_STATE} "
                          "(torch.load weights_only): convert it to tensors or primitive containers")


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python ``random``, numpy's global generator, torch CPU (and CUDA when available)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states restored when present and CUDA is available)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- saving


def unwrap_model(model: Any) -> Any:
    """The HF model inside DDP / DeepSpeed wrappers (``.module`` chains)."""
    while hasattr(model, "module") and not hasattr(model, "save_pretrained"):
        model = model.module
    return model


def default_save_model(model: Any, directory: Path) -> None:
    """``save_pretrained`` (safetensors; transformers 5 always writes safetensors) of the unwrapped model."""
    unwrap_model(model).save_pretrained(directory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> dict[str, int]:
    sizes = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            sizes[p.relative_to(root).as_posix()] = p.stat().st_size
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(d)
    return sizes


def _hidden(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_dir(path: Path) -> None:
    """Rename to a hidden name first (atomic), then delete: never a half-deleted visible checkpoint."""
    doomed = _hidden(path, "del")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def staging_path(path: str | Path) -> Path:
    """A fresh hidden temp dir name beside ``path`` for :func:`save_checkpoint` (``staging=``): other processes
    (e.g. every rank's share of a DeepSpeed state) may write into it before the checkpoint is published."""
    return _hidden(Path(path), "tmp")


def save_checkpoint(path: str | Path, *, model: Any, tokenizer: Any, trainer_state: dict[str, Any],
                    manifest: dict[str, Any], save_model_fn: Callable[[Any, Path], None] | None = None,
                    include_rng: bool = True, verify_state: bool = True, staging: Path | None = None,
                    extra_files: dict[str, int] | None = None, checksums: bool = True,
                    extra_checksums: dict[str, str] | None = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring); returns ``path``.

    ``model`` may be wrapped (DDP: ``.module`` is unwrapped). ``tokenizer`` may be ``None``. With
    ``include_rng`` the current RNG states are added as ``trainer_state["rng"]`` unless the caller gave one.
    ``save_model_fn(model, directory)`` replaces :func:`default_save_model` (e.g. a DeepSpeed-gathered save,
    or a test's failure injection). ``verify_state`` reads ``trainer_state.pt`` back with ``weights_only=True``
    before publishing (catches an unloadable state at save time rather than at resume). ``staging``: an existing
    dir from :func:`staging_path` that already holds files to publish with the checkpoint (listed in the
    manifest like the rest); it is used instead of a new temp dir and removed on failure. ``extra_files``
    (name → size): files other nodes' ranks published at the checkpoint's URI themselves, listed too, with
    ``extra_checksums`` (name → CRC-32, computed by those ranks). ``checksums``: the CRC-32 of every file written
    here goes into the manifest (:data:`CHECKSUMS`), checked when a run loads the file (:func:`verify_checksums`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(trainer_state)
    if include_rng and "rng" not in state:
        state["rng"] = capture_rng_state()
    state = to_safe_state(state)
    remove_stale_temps(path.parent, name=path.name, keep=staging)
    tmp = staging if staging is not None else _hidden(path, "tmp")
    tmp.mkdir(exist_ok=staging is not None)
    try:
        (save_model_fn or default_save_model)(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / TRAINER_STATE)
        if verify_state:
            try:
                torch.load(tmp / TRAINER_STATE, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling refusal, reported with the checkpoint's name
                raise CheckpointError(f"{path}: trainer state would not load with weights_only=True: {e}") from None
        written = _fsync_tree(tmp)
        sizes = {**(extra_files or {}), **written}
        full = {**manifest, "format": FORMAT_VERSION, "files": sizes, "complete": True}
        if checksums:
            full[CHECKSUMS] = {**(extra_checksums or {}), **{name: file_crc32(tmp / name) for name in written}}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(full, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = _hidden(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


class HostSnapshot:
    """A copy on the host of a nested structure of tensors (state dicts), taken on the training thread so that a
    background thread can write it while training changes the live tensors.

    :meth:`take` rebuilds dicts / lists / tuples and copies every tensor into host memory: a tensor reached
    twice (tied weights: two state-dict keys over one storage) is copied once and stays shared, so
    ``save_pretrained(state_dict=...)`` sees the same ties as on the live model. Buffers are allocated once and
    kept between saves (no allocation or page faults per save). CUDA tensors are copied with ``non_blocking``
    into pinned buffers on the current stream — the kernels queued after them (the next optimizer step) run
    after the copies in stream order, so the host never waits here. :meth:`wait` (the writer thread) blocks
    until the copies are done and returns the copy. Only one snapshot may be in flight: the caller joins the
    previous write first (the buffers are reused)."""

    def __init__(self) -> None:
        self._pool: dict[tuple[Any, ...], torch.Tensor] = {}
        self._copy: Any = None
        self._event: Any = None

    def take(self, obj: Any) -> HostSnapshot:
        memo: dict[tuple[Any, ...], torch.Tensor] = {}
        self._cuda = False
        self._copy = self._walk(obj, (), memo)
        self._event = torch.cuda.current_stream().record_event() if self._cuda else None
        return self

    def wait(self) -> Any:
        if self._event is not None:
            self._event.synchronize()
        return self._copy

    def _walk(self, obj: Any, key: tuple[Any, ...], memo: dict[tuple[Any, ...], torch.Tensor]) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            alias = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype)
            if alias in memo:
                return memo[alias]
            buf = self._pool.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
                self._pool[key] = buf
            buf.copy_(t, non_blocking=t.is_cuda)
            self._cuda = self._cuda or t.is_cuda
            memo[alias] = buf
            return buf
        if isinstance(obj, Mapping):
            return {k: self._walk(v, (*key, k), memo) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._walk(v, (*key, i), memo) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._walk(v, (*key, i), memo) for i, v in enumerate(obj))
        return obj


def state_dict_saver(state_dict: dict[str, torch.Tensor]) -> Callable[[Any, Path], None]:
    """A ``save_model_fn`` for :func:`save_checkpoint` that writes ``state_dict`` (a :class:`HostSnapshot` of the
    model's) with the model's ``save_pretrained``: the same files as the live save, without reading the live
    weights (the model supplies only its config and tie information)."""

    def save(model: Any, directory: Path) -> None:
        unwrap_model(model).save_pretrained(directory, state_dict=dict(state_dict))

    return save


def remove_stale_temps(root: str | Path, *, name: str | None = None, keep: Path | None = None) -> list[Path]:
    """Delete hidden leftovers (``.tmp-``/``.old-``/``.del-`` dirs) of saves by other processes under ``root``
    (only those of checkpoint ``name`` when given; never ``keep``). Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    me = f"-{os.getpid()}-"
    for p in root.iterdir():
        if not (p.is_dir() and p.name.startswith(".") and any(m in p.name for m in _HIDDEN_MARKERS)):
            continue
        if name is not None and not p.name.startswith(f".{name}."):
            continue
        if me in p.name or (keep is not None and p.name == keep.name):   # this process's own save in progress
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# --------------------------------------------------------------------------- reading


_ZERO_PARTITION = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_[^/]*$")
"""DeepSpeed's name for one data-parallel rank's ZeRO partition (optimizer states; under ZeRO-3 also the
module's): ``[bf16_]zero_pp_rank_<dp rank>_mp_rank_<mp rank>_{optim,model}_states.pt``."""


def zero_world(manifest: Mapping[str, Any]) -> int | None:
    """The number of data-parallel ranks a checkpoint's DeepSpeed ZeRO state is partitioned over, from the files
    its manifest lists (``None``: no ZeRO state). DeepSpeed loads it only at that world size."""
    ranks = {int(m.group(1)) for name in manifest.get("files") or {}
             if name.startswith(f"{ENGINE_DIR}/") and (m := _ZERO_PARTITION.search(name))}
    return len(ranks) or None


def saved_zero_world(ref: str | Path) -> int | None:
    """:func:`zero_world` of checkpoint ``ref`` (local or URI), from its manifest alone."""
    if not storage.is_uri(str(ref)):
        return zero_world(read_manifest(ref, check_files=False))
    store, rel = storage.store_and_rel(str(ref))
    try:
        return zero_world(json.loads(store.read_bytes(f"{rel}/{MANIFEST}")))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise CheckpointError(f"{ref}: cannot read its {MANIFEST} ({e})") from None


def _skip_for(engine: bool, rank: int | None) -> Callable[[str], bool] | None:
    if not engine:
        return lambda name: name.startswith(f"{ENGINE_DIR}/")
    if rank is None:
        return None

    def other_ranks(name: str) -> bool:
        m = _ZERO_PARTITION.search(name)
        return name.startswith(f"{ENGINE_DIR}/") and m is not None and int(m.group(1)) != rank

    return other_ranks


def fetch(ref: str | Path, *, engine: bool = True, rank: int | None = None) -> Path:
    """The local directory of checkpoint ``ref``: a local path as is; a URI downloaded into the node's scratch
    (:func:`kcpt.storage.fetch_tree`; reused while its manifest is unchanged). A URI whose manifest is missing or
    whose listed files are not all uploaded is a :class:`CheckpointError` (never taken half-uploaded); so is a file
    the caller will load that differs from its checksum (:func:`verify_checksums`).

    What a caller needs, and only that, is downloaded: ``engine=False`` leaves out :data:`ENGINE_DIR` (the
    optimizer state, about twice the weights under AdamW: a hand-off with ``restore: weights_only``, a KL
    reference, the trainer state); ``rank`` leaves out the other data-parallel ranks' ZeRO partitions (DeepSpeed
    reads only its own rank's when the world size is unchanged, and refuses another world size). Ranks on one
    node share one mirror, which each call tops up with the files it lacks."""
    skip = _skip_for(engine, rank)
    local = Path(ref) if not storage.is_uri(str(ref)) else _fetch_tree(str(ref), skip)
    try:
        verify_checksums(local, skip=skip)  # what the caller is about to load
    except CheckpointError as e:
        if not storage.is_uri(str(ref)):
            raise
        # the node's copy differs from the manifest: dropped, so that the next fetch downloads it again (a repaired
        # checkpoint in the bucket is taken); the error names the checkpoint by its URI
        shutil.rmtree(local, ignore_errors=True)
        raise CheckpointError(str(e).replace(str(local), str(ref))) from None
    return local


def _fetch_tree(uri: str, skip: Callable[[str], bool] | None) -> Path:
    """:func:`kcpt.storage.fetch_tree` of checkpoint ``uri`` (manifest last; ``skip``: files not wanted), its
    failures as :class:`CheckpointError`."""
    try:
        return storage.fetch_tree(uri, marker=MANIFEST, files_of=lambda m: dict(m.get("files") or {}), skip=skip)
    except FileNotFoundError as e:
        raise CheckpointError(f"incomplete or missing checkpoint: {e}") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{uri}: cannot download the checkpoint ({e})") from None


def _is_bulk(name: str) -> bool:
    """The files of a checkpoint that checks before a run never read whole: weights and engine state."""
    return name.startswith(f"{ENGINE_DIR}/") or name.endswith(".safetensors")


def inspect(ref: str | Path) -> tuple[dict[str, Any], Path]:
    """What a driver checks before a run, without the bulk of checkpoint ``ref``: its manifest and a local
    directory holding its small files (trainer state, model config, tokenizer, weight index).

    A local checkpoint is itself: every listed file present with its size, its weights openable
    (:func:`verify_weights`). At a URI only the small files are downloaded (into the node's mirror, which a
    worker on the same node tops up); every listed file is checked present with its size at the URI, and each
    safetensors file's header is read with two range requests. The weights and the optimizer state (several
    times the weights) are left to the workers, which download them on their own nodes."""
    if not storage.is_uri(str(ref)):
        verify_weights(ref)
        return read_manifest(ref), Path(ref)
    local = _fetch_tree(str(ref), _is_bulk)
    manifest = read_manifest(local, check_files=False)  # the sizes were checked at the URI by the fetch
    store, rel = storage.store_and_rel(str(ref))
    files = manifest.get("files") or {}
    for f in _safetensors_files(local, listed=set(files)):
        name = f.relative_to(local).as_posix()
        _check_safetensors_header(lambda off, n, key=f"{rel}/{name}": store.read_range(key, off, n), files[name],
                                  storage.join(str(ref), name))
    return manifest, local


def _check_safetensors_header(read: Callable[[int, int], bytes], size: int, where: str) -> None:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the header (a JSON
    object); ``read(offset, n)`` reads bytes of a file of ``size`` bytes."""
    head = read(0, 8) if size >= 8 else b""
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    try:
        ok = 0 < n <= size - 8 and isinstance(json.loads(read(8, n)), dict)
    except (ValueError, OSError):
        ok = False
    if not ok:
        raise CheckpointError(f"{where}: cannot open the weights (no valid safetensors header); the checkpoint is "
                              "damaged")


CHECKSUMS = "crc32"
"""Manifest key: file name → CRC-32 (8 hex digits) of each file the saving node wrote. A file changed after the save
at the same size (a disk or copy error) is caught when a run loads it, not trained on."""

_VERIFIED: set[tuple[str, str, int, int]] = set()
"""(file, checksum, size, mtime) already verified in this process: a checkpoint fetched twice is read once."""


def file_crc32(path: Path) -> str:
    """CRC-32 of the file at ``path`` (8 hex digits; read in 16 MiB blocks, ~2 GB/s on one core)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def verify_checksums(path: Path, *, skip: Callable[[str], bool] | None = None) -> None:
    """Check the files of local checkpoint ``path`` against the manifest's :data:`CHECKSUMS` (those ``skip``
    leaves out, and those a node's partial copy lacks, excepted); :class:`CheckpointError` naming the first that
    differs. A checkpoint written without checksums passes, and so does a directory without a manifest (a plain
    Hugging Face model directory, which some commands take where a checkpoint goes)."""
    if not (Path(path) / MANIFEST).is_file():
        return
    manifest = read_manifest(path, check_files=False)
    for name, want in (manifest.get(CHECKSUMS) or {}).items():
        f = path / name
        if (skip is not None and skip(name)) or not f.is_file():
            continue
        st = f.stat()
        key = (str(f.resolve()), want, st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            continue
        got = file_crc32(f)
        if got != want:
            raise CheckpointError(f"{path}: file {name} does not match its checksum in {MANIFEST} (CRC-32 {got}, "
                                  f"saved {want}): it changed after the save; the checkpoint is damaged")
        _VERIFIED.add(key)


def read_manifest(path: str | Path, *, check_files: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint; :class:`CheckpointError` if it is missing, incomplete, or (with
    ``check_files``) a file it lists is missing or has another size. A node's copy of a checkpoint at a URI
    (:func:`fetch`) holds the parts its ranks asked for, each checked against the bucket as it came: a file
    absent there is one no rank of the node needed, not a damage."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"incomplete checkpoint {path} (no {MANIFEST}; kcpt's saves are atomic, so it was "
                              "written or changed by something else)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{mf}: unreadable manifest ({e}); the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise CheckpointError(f"incomplete checkpoint {path} ({MANIFEST} lacks \"complete\": true)")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(n, str) and type(v) is int for n, v in files.items()):
        raise CheckpointError(f"{mf}: 'files' must map file names to sizes: a damaged manifest")
    sums = manifest.get(CHECKSUMS, {})
    if not isinstance(sums, dict) or not all(isinstance(n, str) and isinstance(v, str) for n, v in sums.items()):
        raise CheckpointError(f"{mf}: '{CHECKSUMS}' must map file names to checksums: a damaged manifest")
    if any(not isinstance(manifest.get(k, 0), int) for k in ("step", "stage_index")) or \
            not isinstance(manifest.get("data_sha256") or {}, dict):
        raise CheckpointError(f"{mf}: 'step', 'stage_index' or 'data_sha256' has the wrong type: a damaged manifest")
    if check_files:
        fetched = (path / storage.MARKER_COPY).is_file()
        for name, size in files.items():
            f = path / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                raise CheckpointError(f"{mf}: file name {name!r} points outside the checkpoint")
            if not f.is_file():
                if fetched:
                    continue
                raise CheckpointError(f"{path}: file {name} listed in {MANIFEST} is missing")
            if f.stat().st_size != size:
                raise CheckpointError(f"{path}: file {name} has {f.stat().st_size} bytes, {MANIFEST} says {size}")
    return manifest


def model_dir(path: str | Path) -> Path:
    """Directory to give ``from_pretrained`` (model and tokenizer): the checkpoint itself, once checked complete."""
    read_manifest(path)
    return Path(path)


def load_trainer_state(path: str | Path, *, check_files: bool = True) -> dict[str, Any]:
    """``trainer_state.pt`` of a complete checkpoint, loaded on CPU with ``weights_only=True`` (``check_files``
    False: the small-files copy of :func:`inspect`)."""
    path = Path(path)
    read_manifest(path, check_files=check_files)
    try:
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {TRAINER_STATE} (a weights-only export?)") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ... for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path / TRAINER_STATE}: cannot load the trainer state ({type(e).__name__}: "
                              f"{first[:200]}); the file is damaged or was not written by kcpt: resume from "
                              "another checkpoint or start over") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / TRAINER_STATE}: not a kcpt trainer state (a {type(state).__name__})")
    return state


def verify_weights(path: str | Path) -> None:
    """Check that a checkpoint's model files can be opened (safetensors headers, ``config.json``) without
    loading the tensors: a damaged checkpoint is refused before a run starts, not inside a worker."""
    from safetensors import safe_open

    path = Path(path)
    read_manifest(path)
    cfg = path / "config.json"
    try:
        if cfg.is_file():
            json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: unreadable model config ({e})") from None
    for f in _safetensors_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise CheckpointError(f"{f}: cannot open the weights ({e}); the checkpoint is damaged") from None


def _safetensors_files(path: Path, listed: set[str] | None = None) -> list[Path]:
    """The weight files of checkpoint ``path``: the shards its index names, or ``model.safetensors``
    (``listed``: the names its manifest lists, for a copy without the weights themselves)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: damaged weight index ({type(e).__name__}: {e})") from None
        if not all(isinstance(s, str) and "/" not in s and s not in ("", ".", "..") for s in shards):
            raise CheckpointError(f"{index}: damaged weight index (bad shard names)")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file() if listed is None else single.name in listed:
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors (or index) to load weights from")


def load_model_weights(model: Any, path: str | Path) -> None:
    """Load a checkpoint's safetensors into an existing model (DDP-wrapped ok), in place.

    Every saved tensor must match a parameter/buffer by name and shape; a parameter missing from the files is
    accepted only when it is tied to a loaded one (e.g. ``lm_head.weight`` tied to the embeddings).
    """
    from safetensors.torch import load_file

    path = Path(path)
    read_manifest(path)
    target = unwrap_model(model)
    sd: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(path):
        try:
            sd.update(load_file(f))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... for a damaged file
            raise CheckpointError(f"{f}: cannot load the weights ({e}); the checkpoint is damaged") from None
    own = target.state_dict()
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if unexpected or shapes:
        raise CheckpointError(f"{path}: weights do not fit the model: "
                              + "; ".join([*(f"unexpected {k}" for k in unexpected[:5]), *shapes[:5]]))
    result = target.load_state_dict(sd, strict=False)
    loaded_ptrs = {own[k].data_ptr() for k in sd}
    really_missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if really_missing:
        raise CheckpointError(f"{path}: checkpoint lacks weights for {really_missing[:5]}"
                              + (" ..." if len(really_missing) > 5 else ""))


# --------------------------------------------------------------------------- manifests and compatibility


def build_manifest(*, tokenizer_sha256: str | None, data_sha256: dict[str, str], config_sha256: str | None,
                   base_model: str | None, restore_mode: str, step: int, stage: str, stage_index: int,
                   metrics: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The manifest dict of a checkpoint (``save_checkpoint`` adds ``files``, ``format`` and ``complete``)."""
    return {
        "kcpt_version": kcpt.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer_sha256": tokenizer_sha256,
        "data_sha256": dict(data_sha256),
        "config_sha256": config_sha256,
        "base_model": base_model,
        "restore_mode": restore_mode,
        "step": int(step),
        "stage": stage,
        "stage_index": int(stage_index),
        "metrics": dict(metrics or {}),
        **extra,
    }


def _short(x: Any) -> str:
    return "none" if x is None else (f"{x[:12]}…" if isinstance(x, str) and len(x) > 12 else str(x))


def check_compatible(manifest: dict[str, Any], expected: dict[str, Any], *, mode: str, force: bool = False,
                     where: str = "checkpoint") -> None:
    """Refuse to restore a checkpoint built with another tokenizer / data / config.

    ``mode="full"``: ``tokenizer_sha256``, ``data_sha256`` (per dataset name) and ``config_sha256`` must equal
    ``expected``'s (keys absent from ``expected`` are not compared). ``mode="weights_only"``: only
    ``tokenizer_sha256`` (the vocabulary must be the same). A mismatch raises :class:`CheckpointError` listing
    what differs; with ``force`` it is logged as a warning instead.
    """
    if mode not in ("full", "weights_only"):
        raise ValueError(f"mode must be 'full' or 'weights_only', got {mode!r}")
    keys = ["tokenizer_sha256"] + (["data_sha256", "config_sha256"] if mode == "full" else [])
    diffs = []
    for key in keys:
        if key not in expected:
            continue
        old, new = manifest.get(key), expected[key]
        if key == "data_sha256":
            old, new = old or {}, new or {}
            for name in sorted(set(old) | set(new)):
                if name not in new:
                    diffs.append(f"data_sha256[{name!r}]: the checkpoint's run used dataset '{name}' and this run "
                                 "does not (other --stages or another plan?)")
                elif name not in old:
                    diffs.append(f"data_sha256[{name!r}]: this run uses dataset '{name}' and the checkpoint's run "
                                 "did not")
                elif old[name] != new[name]:
                    diffs.append(f"data_sha256[{name!r}]: checkpoint {_short(old.get(name))} vs now "
                                 f"{_short(new.get(name))} (the dataset's inputs or preparation changed)")
        elif old != new:
            diffs.append(f"{key}: checkpoint {_short(old)} vs now {_short(new)}")
    if not diffs:
        return
    msg = f"{where} does not match this run ({mode} restore): " + "; ".join(diffs)
    if force:
        log.warning("%s — continuing because of --force", msg)
        return
    raise CheckpointError(f"{msg}. Pass --force to override.")


# --------------------------------------------------------------------------- listing and pruning


def _order_key(path: Path, manifest: dict[str, Any]) -> tuple[int, int, str]:
    return int(manifest.get("stage_index", 0)), int(manifest.get("step", 0)), path.name


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints directly under ``root``, oldest first by (stage_index, step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            found.append((_order_key(p, read_manifest(p, check_files=False)), p))
        except CheckpointError:
            continue
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | Path, keep_last: int, keep: Iterable[str | Path] = ()) -> list[Path]:
    """Delete complete checkpoints under ``root`` except the last ``keep_last`` and those in ``keep`` (e.g. each
    stage's best); also removes leftovers of interrupted saves. Returns the deleted checkpoints."""
    keep_set = {Path(k).resolve() for k in keep}
    ckpts = list_checkpoints(root)
    last = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    removed = []
    for p in ckpts:
        if p in last or p.resolve() in keep_set:
            continue
        _remove_dir(p)
        removed.append(p)
    remove_stale_temps(root)
    return removed


def iter_incomplete(root: str | Path) -> Iterable[Path]:
    """Visible directories under ``root`` that are not complete checkpoints (for reports)."""
    root = Path(root)
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and not p.name.startswith("."):
            try:
                read_manifest(p, check_files=False)
            except CheckpointError:
                yield p



def moved_prefixes(state: Any, resume_ref: str) -> tuple[str, str] | None:
    """``(old, new)`` checkpoint-directory prefixes when the run directory of ``resume_ref`` (the checkpoint being
    resumed, in this run directory; ``state`` its trainer state) was copied or moved since it was written; else
    None.

    A trainer state names the run's checkpoints (stage summaries, hand-off candidates, ``cpt_best``, the evals) by
    the directory they were written in. After a copy or a move those names point at the old place: a resume would
    hand off from (and keep depending on) the original, prune the copy's own checkpoints, or, after a move, fail.
    :func:`reroot_paths` with these prefixes names them where they are now. The old place is read from the state's
    own entry in ``evals``; checkpoints of other runs (an ``init_checkpoint``) do not start with it.
    """
    name = resume_ref.rstrip("/").rsplit("/", 1)[-1]
    own = next((e["checkpoint"] for e in reversed(state.get("evals") or []) if isinstance(e, dict)
                and isinstance(e.get("checkpoint"), str) and e["checkpoint"].rstrip("/").endswith("/" + name)), None)
    if own is None:
        return None
    old, new = own.rstrip("/")[: -len(name)], resume_ref.rstrip("/")[: -len(name)]
    return None if old == new else (old, new)


def reroot_paths(obj: Any, old: str, new: str) -> Any:
    """``obj`` with every string that starts with the prefix ``old`` (a checkpoints directory, ``/``-terminated)
    starting with ``new`` instead (dicts, lists and tuples walked)."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj.startswith(old) else obj
    if isinstance(obj, dict):
        return {k: reroot_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(reroot_paths(v, old, new) for v in obj)
    return obj
