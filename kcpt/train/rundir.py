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
```
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from kcpt.config import KcptConfig, dump_config


def run_dir_for(cfg: KcptConfig) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.run_name


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


class RunDir:
    """Paths and writers of one run directory (writers are used by rank 0 only)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

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
    def faults(self) -> Path:
        return self.root / "faults"

    @property
    def aborted_path(self) -> Path:
        return self.root / "aborted.json"

    def write_aborted(self, message: str) -> None:
        self.aborted_path.write_text(json.dumps({"message": message}, ensure_ascii=False), encoding="utf-8")

    def read_aborted(self) -> str | None:
        """The message of a deterministic abort of the last attempt, or None."""
        if not self.aborted_path.is_file():
            return None
        return json.loads(self.aborted_path.read_text(encoding="utf-8"))["message"]

    def create(self, cfg: KcptConfig) -> RunDir:
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        dump_config(cfg, self.config_path)
        return self

    def latest_checkpoint(self, stages: list[str]) -> Path | None:
        """The most advanced checkpoint of a run of ``stages`` (by stage position, then step), or None. Visible
        checkpoint directories are complete (written under a hidden name and renamed; pruned ones are hidden
        before they are deleted)."""
        if not self.checkpoints.is_dir():
            return None
        best: tuple[tuple[int, int], Path] | None = None
        for p in self.checkpoints.iterdir():
            if not p.is_dir() or p.name.startswith("."):
                continue
            try:
                pos_s, rest = p.name.split("-", 1)
                name, step_s = rest.rsplit("-step", 1)
                key = (int(pos_s), int(step_s))
            except ValueError:
                continue
            if pos_s.isdigit() and int(pos_s) < len(stages) and stages[int(pos_s)] == name and \
                    (best is None or key > best[0]):
                best = (key, p)
        return best[1] if best else None

    # ----------------------------------------------------------------- metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.root)

    def truncate_metrics(self, keep: Any) -> None:
        """Rewrite metrics.jsonl keeping the records for which ``keep(record)`` is true (used on resume, so
        evals repeated after a restart are not recorded twice)."""
        if not self.metrics_path.exists():
            return
        kept = [r for r in self.read_metrics() if keep(r)]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    # ----------------------------------------------------------------- summary
    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.exists():
            return {"stages": {}, "stage_order": [], "baseline_raw_best": None}
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(summary), indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.summary_path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The eval records of a run (one dict per line of metrics.jsonl)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class ScalarLogger:
    """TensorBoard scalars of one stage under ``tb/<stage>/`` (rank 0). ``purge_step`` drops events a previous
    attempt wrote at or after that step (resume after a failure)."""

    def __init__(self, run_dir: RunDir, stage: str, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
