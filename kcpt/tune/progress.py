"""Tune's console: one line per trial started / finished and a running tally, instead of Tune's result table.

:class:`TuneConsole` is a Ray Tune callback (it runs on the driver). Tune itself runs with ``verbose=0`` unless
``logging.verbose``. On an interactive terminal a tqdm bar counts finished trials (postfix: running, pruned,
failed, best feasible so far); otherwise each event is a plain line. A trial is *pruned* when the scheduler stopped
it before the eval that ends its stage: it ended without its final gate summary and without a report marked
``stage_done`` (a stop on that last eval loses nothing, and the searcher tells Optuna COMPLETE for it, so the
console says the same); a failed trial's error is printed whole.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

from ray.tune import Callback

from kcpt.console import is_tty
from kcpt.tune.searcher import ends_trial


def _short(params: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return format(v, ".4g") if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={f(v)}" for k, v in sorted(params.items()))


class TuneConsole(Callback):
    """Trials done / running / pruned / failed and the best feasible trial so far (see the module docstring)."""

    def __init__(self, num_samples: int, *, stream: TextIO | None = None, progress: bool = True,
                 bars: bool | None = None, earlier: int = 0, best: tuple[float, str] | None = None) -> None:
        """``earlier``, ``best``: the experiment's trials ended in its earlier Tune runs and the study's best feasible
        (objective, Ray trial id) — a resume that added trials counts on from them."""
        self.earlier = earlier
        self.total = earlier + num_samples
        self.stream = stream or sys.stdout
        self.bars = progress and (is_tty(self.stream) if bars is None else bars)
        self.running: set[str] = set()
        self.finals: dict[str, dict[str, Any]] = {}
        self.done, self.pruned, self.failed = earlier, 0, 0
        self.ended: set[str] = set()
        self.best: tuple[float, str, dict[str, Any]] | None = None if best is None else (*best, {})
        self._bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the experiment state: the stream and the bar stay behind (a restored
        console writes to this process's stdout)."""
        state = dict(self.__dict__)
        state["stream"], state["_bar"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("ended", set())
        self.__dict__.setdefault("earlier", 0)
        self.stream = self.stream or sys.stdout

    # ------------------------------------------------------------------ output
    def _write(self, line: str) -> None:
        if self.bars and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc="[tune] trials", unit="trial", file=self.stream,
                             dynamic_ncols=True)
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
            self._bar.n = self.done
            self._bar.set_postfix_str(self.tally(), refresh=True)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def tally(self) -> str:
        best = "none yet" if self.best is None else f"{self.best[1]} objective {self.best[0]:.4f}"
        return (f"{self.done}/{self.total} done, {len(self.running)} running, {self.pruned} pruned, "
                f"{self.failed} failed; best feasible: {best}")

    # ------------------------------------------------------------------ Tune callbacks
    def _sync(self, trials: list) -> None:
        """Count as done every trial Tune holds as ended, and take the feasible ones' final reports into the best so
        far: a resumed experiment's earlier trials included (this console's own counts and best start from Tune's
        last saved state, which may predate their end)."""
        for t in trials:
            if getattr(t, "status", None) in ("TERMINATED", "ERROR"):
                self.ended.add(t.trial_id)
                last = getattr(t, "last_result", None)
                if t.status == "TERMINATED" and ends_trial(last):
                    self._consider(t.trial_id, last)
        self.done = self.earlier + len(self.ended)

    def _consider(self, trial_id: str, final: dict[str, Any]) -> bool:
        """Whether ``final`` (a trial's last report) is feasible; the best feasible so far is updated."""
        obj = final.get("gate_objective")
        feasible = bool(final.get("gate_feasible")) and obj is not None and not math.isnan(obj)
        if feasible and (self.best is None or obj < self.best[0]):
            self.best = (obj, trial_id, dict(final))
        return feasible

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._sync(trials)
        self.running.add(trial.trial_id)
        self._write(f"[tune] trial {trial.trial_id} started: {_short(trial.config or {})}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        if ends_trial(result):
            self.finals[trial.trial_id] = dict(result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.ended.add(trial.trial_id)
        self._sync(trials)
        final = self.finals.get(trial.trial_id)
        if final is None:
            self.pruned += 1
            last = trial.last_result or {}
            what = (f"pruned at step {last.get('step', '?')} (exam {last.get('exam_val_loss', float('nan')):.4f}, "
                    f"raw ×{last.get('raw_ratio') or float('nan'):.3f})")
        else:
            verdict = "feasible" if self._consider(trial.trial_id, final) else "infeasible"
            what = (f"{verdict}, objective {final.get('gate_objective', math.nan):.4f} "
                    f"(step {final.get('selected_step')}, raw ×{final.get('selected_raw_ratio', math.nan):.3f})"
                    f"{', gate passed' if final.get('gate_passed') else ''}")
        self._write(f"[tune] trial {trial.trial_id} {what} | {self.tally()}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.ended.add(trial.trial_id)
        self._sync(trials)
        self.failed += 1
        self._write(f"[tune] trial {trial.trial_id} failed | {self.tally()}\n{_error_text(trial)}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _error_text(trial: Any) -> str:
    """The trial's error with its traceback (Tune's error file), else its repr."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().rstrip()
        except OSError:
            pass
    return repr(trial.get_error()) if hasattr(trial, "get_error") else "(no error recorded)"
