"""DeepSpeed ZeRO state for another world size: DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one partition of the optimizer state (fp32 master weights, AdamW's moments; under ZeRO-3
the parameters too) per data-parallel rank, and DeepSpeed loads it only at the world size that wrote it. A run
resumed on another number of workers (a node lost, a bigger allocation) converts it instead with DeepSpeed's own
converter, ``python -m deepspeed.checkpoint.ds_to_universal`` — one directory per parameter holding its whole
``fp32``, ``exp_avg``, ``exp_avg_sq`` and ``step`` — and every rank loads its new slice from that
(``checkpoint.load_universal``; :meth:`kcpt.train.engine.DeepSpeedEngine.load_state`). Nothing of the training
state is lost: the weights, the moments and the step count carry over exactly; only the split changes.

The conversion runs once per node (a file lock; the first rank converts, the node's others wait and reuse it) into
node scratch, keyed by the checkpoint's manifest, and needs every rank's partition on the node (the whole optimizer
state: about 12 bytes per parameter under AdamW in fp32), plus as much again for the converted copy. The
checkpoint itself is never written to.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kcpt import storage
from kcpt.errors import CheckpointError
from kcpt.train.checkpoint import ENGINE_DIR, MANIFEST

log = logging.getLogger(__name__)

CONVERTER = "deepspeed.checkpoint.ds_to_universal"
"""DeepSpeed's converter, run as a module (its documented command line)."""


def copy_key(checkpoint: Path) -> str:
    """The name of checkpoint ``checkpoint``'s converted copy in node scratch (``universal/<key>``)."""
    return hashlib.sha256((checkpoint / MANIFEST).read_bytes()).hexdigest()[:24]


def universal_dir(checkpoint: Path, tag: str) -> Path:
    """A directory holding ``<tag>/``, the universal form of the DeepSpeed state ``engine/<tag>/`` (a
    ``save_checkpoint`` tag directory with every rank's partition) of kcpt checkpoint ``checkpoint`` (local; its
    manifest keys the copy). Converted once per node; :class:`CheckpointError` with the converter's last lines if it
    fails."""
    state = checkpoint / ENGINE_DIR / tag
    key = copy_key(checkpoint)
    root = storage.scratch_root() / "universal" / key
    with storage.file_lock(root.parent / f".{key}.lock"):
        if (root / "done").is_file():
            return root
        shutil.rmtree(root, ignore_errors=True)  # a conversion killed half-way
        out = root / tag
        out.parent.mkdir(parents=True, exist_ok=True)
        workers = str(max(1, min(4, os.cpu_count() or 1)))
        cmd = [sys.executable, "-m", CONVERTER, "--input_folder", str(state), "--output_folder", str(out),
               "--inject_missing_state", "--num_extract_workers", workers, "--num_merge_workers", workers]
        log.info("converting %s to DeepSpeed's universal checkpoint in %s", state, out)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not (out / "zero").is_dir():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            shutil.rmtree(root, ignore_errors=True)
            raise CheckpointError(f"{checkpoint}: DeepSpeed could not convert its ZeRO state to a universal "
                                  f"checkpoint for another world size ({CONVERTER} exited {done.returncode}):\n{tail}"
                                  f"\nResume with the world size that wrote it, or start from its weights "
                                  f"(restore: weights_only; the optimizer starts fresh)")
        (root / "done").write_text("ok")
    return root
