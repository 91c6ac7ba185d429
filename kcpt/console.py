"""The console a person reads: kcpt's lines on the driver, Ray's own output in Ray's log files.

Quiet by default (``logging.verbose: false``; ``--verbose`` on train/tune/prepare sets it):

- :func:`ray_init_kwargs`: ``ray.init(log_to_driver=False, logging_level=WARNING)`` — the stdout/stderr of Ray's
  workers and actors (Train controller, Train workers, Tune trials, Ray Data tasks) stay in Ray's per-process log
  files (``<session_dir>/logs``, named on the console when Ray starts), and Ray's driver-side INFO lines are not
  emitted. Tune runs with ``verbose=0`` and a kcpt :class:`TuneConsole` callback instead of its result table.
  Errors are not logs: a failing worker's exception (with its traceback) travels back to the driver with
  the result and is raised there.
- Training events travel to the driver through a Ray queue (:func:`console_feed`): rank 0 of the stage loop
  sends stage start/progress/eval/stage end events; the driver's :class:`Console` prints one line per eval and
  one line per stage decision, or, on an interactive terminal, draws a tqdm bar per stage (steps, tokens, ETA,
  last raw/exam, gate streak) with the same lines above it. This works with ``log_to_driver`` off, under
  ``ray job submit`` (the driver's stdout is the job log) and across nodes.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PROGRESS_EVERY_S = 1.0
"""Rank 0 sends a progress event at most this often (only when the driver draws a bar)."""


def ray_init_kwargs(verbose: bool) -> dict[str, Any]:
    """``ray.init`` keyword arguments for the console: Ray's output on the driver only with ``verbose``."""
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


QUIET_RAY_LOGGERS = ("ray.tune", "ray.data")
"""Ray libraries whose driver-side log lines (Tune's slow-callback warnings, its "Resume experiment with
Tuner.restore(...)" on Ctrl-C — not how a kcpt run resumes —, Ray Data's INFO and progress notes) kcpt's console
replaces: errors only, unless ``verbose``. Their log files in Ray's session directory keep everything."""


def quiet_ray_loggers(verbose: bool) -> None:
    """Without ``verbose``, :data:`QUIET_RAY_LOGGERS` print errors only on this console."""
    if not verbose:
        for name in QUIET_RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def is_tty(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def eval_line(m: dict[str, Any]) -> str:
    """One human line per eval."""
    gate = "" if m.get("gate_ok") is None else f"  gate {'ok' if m['gate_ok'] else 'no'} ×{m.get('gate_streak', 0)}"
    stop = f"  → {m['stop_reason']}" if m.get("stop") else ""
    acc = "".join(f" {name} {_fmt(m[k], '.3f')}" for k, name in (("exam_acc", "acc"), ("exam_em", "em"),
                                                                  ("exam_f1", "f1")) if m.get(k) is not None)
    return (f"[{m['stage']}] step {m['step']:>5}  train {_fmt(m.get('train_loss'))}  raw {_fmt(m.get('raw_val_loss'))} "
            f"(×{_fmt(m.get('raw_ratio'), '.3f')})  exam {_fmt(m.get('exam_val_loss'))}{acc}  kl {_fmt(m.get('kl'))}  "
            f"lr {_fmt(m.get('lr'), '.2e')}  {_fmt(m.get('tokens_per_s'), '.0f')} tok/s{gate}{stop}")


def stage_end_line(s: dict[str, Any]) -> str:
    """The stage decision: why it stopped, passed or not, the best eval and the checkpoint it hands off."""
    verdict = "passed" if s.get("passed") else "did not pass"
    best = (f"best step {s.get('best_step')} (raw {_fmt(s.get('best_raw_val_loss'))}, exam "
            f"{_fmt(s.get('best_exam_val_loss'))}"
            + (f", acc {_fmt(s['best_exam_acc'], '.3f')}" if s.get("best_exam_acc") is not None else "") + ")")
    base = f"; baseline_raw_best {_fmt(s.get('baseline_raw_best'))}" if s.get("sets_baseline") else ""
    warn = f"\n[{s['stage']}] warning: {s['warning']}" if s.get("warning") else ""
    return (f"[{s['stage']}] {verdict}: {s.get('stop_reason') or 'no decision'} after {s.get('steps')} steps; "
            f"{best}{base}; hands off {s.get('best_checkpoint') or '(no checkpoint)'}{warn}")


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Console:
    """Renders training events on the driver (see the module docstring). ``bars``: a tqdm bar per stage (default:
    when ``stream`` is a terminal and ``progress``); otherwise plain lines (with the stage's ETA on eval lines)."""

    def __init__(self, *, stream: TextIO | None = None, progress: bool = True, bars: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.bars = progress and (is_tty(self.stream) if bars is None else bars)
        self._bar: Any = None
        self._stage: dict[str, Any] = {}
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def handle(self, ev: dict[str, Any]) -> None:
        with self._lock:
            getattr(self, f"_on_{ev.get('kind')}", lambda ev: None)(ev)

    def _on_stage_start(self, ev: dict[str, Any]) -> None:
        self._close_bar()
        self._stage = {"name": ev["stage"], "t0": time.monotonic(), "step0": ev.get("step", 0),
                       "max_steps": ev.get("max_steps")}
        if self.bars:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=ev.get("max_steps"), initial=ev.get("step", 0), desc=f"[{ev['stage']}]",
                             unit="step", file=self.stream, dynamic_ncols=True, leave=True)

    def _on_progress(self, ev: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(max(0, ev["step"] - self._bar.n))
            self._bar.set_postfix_str(self._postfix(ev), refresh=True)

    def _postfix(self, ev: dict[str, Any]) -> str:
        self._stage.update({k: ev[k] for k in ("raw", "exam", "gate_streak") if k in ev})
        parts = [f"tok {ev.get('tokens', 0):,}", f"raw {_fmt(self._stage.get('raw'))}",
                 f"exam {_fmt(self._stage.get('exam'))}"]
        if self._stage.get("gate_streak") is not None:
            parts.append(f"gate ×{self._stage['gate_streak']}")
        return "  ".join(parts)

    def _on_eval(self, ev: dict[str, Any]) -> None:
        m = ev["metrics"]
        line = eval_line(m)
        st = self._stage
        if self._bar is not None:
            self._on_progress({"step": m["step"], "tokens": m.get("tokens_seen", 0), "raw": m.get("raw_val_loss"),
                               "exam": m.get("exam_val_loss"),
                               "gate_streak": m.get("gate_streak") if m.get("gate_ok") is not None else None})
        elif st.get("name") == m.get("stage") and st.get("max_steps") and m["step"] > st["step0"]:
            rate = (time.monotonic() - st["t0"]) / (m["step"] - st["step0"])
            left = 0 if m.get("stop") else max(0, st["max_steps"] - m["step"])
            line += f"  [{m['step']}/{st['max_steps']} eta {_eta(rate * left)}]"
        self.write(line)

    def _on_stage_end(self, ev: dict[str, Any]) -> None:
        self._close_bar()
        self.write(stage_end_line(ev["summary"]))

    def _on_line(self, ev: dict[str, Any]) -> None:
        self.write(ev["text"])

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        with self._lock:
            self._close_bar()


class DirectFeed:
    """Worker-side feed when the loop runs in the driver's process (``in_process``): calls the console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.wants_progress = console.bars

    def send(self, event: dict[str, Any]) -> None:
        self.console.handle(event)


class QueueFeed:
    """Worker-side feed: puts events on a ``ray.util.queue.Queue`` the driver drains (best effort: a full or
    vanished queue drops the event; ``metrics.jsonl`` has every eval)."""

    def __init__(self, q: Any, wants_progress: bool) -> None:
        self.queue = q
        self.wants_progress = wants_progress

    def send(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(event)
        except Exception:  # noqa: BLE001 - the console must never fail a training step
            pass


class Throttle:
    """True at most once per ``every`` seconds."""

    def __init__(self, every: float = PROGRESS_EVERY_S) -> None:
        self.every = every
        self._last = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True


@contextmanager
def console_feed(console: Console | None, *, in_process: bool = False) -> Iterator[DirectFeed | QueueFeed | None]:
    """A feed for the stage loop's rank 0 whose events ``console`` prints on this process's stdout; None when
    ``console`` is None. With Ray: a queue actor (0 CPUs) and a thread that drains it until the block ends."""
    if console is None:
        yield None
        return
    if in_process:
        try:
            yield DirectFeed(console)
        finally:
            console.close()
        return
    from ray.util.queue import Empty, Queue

    from kcpt.raystart import on_this_node

    q = Queue(maxsize=100_000, actor_options={"num_cpus": 0, **on_this_node()})  # the driver's node: lives on
    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                ev = q.get(block=True, timeout=0.5)
            except Empty:
                if done.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone (Ray shut down): nothing more to print
                return
            console.handle(ev)

    thread = threading.Thread(target=pump, name="kcpt-console", daemon=True)
    thread.start()
    try:
        yield QueueFeed(q, console.bars)
    finally:
        done.set()
        thread.join(timeout=30)
        console.close()
        try:
            q.shutdown()
        except Exception:  # noqa: BLE001
            pass
