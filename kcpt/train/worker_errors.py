"""A KcptError raised inside a Ray Train worker ends the run at once, as itself.

A KcptError is deterministic: a bad input, a refused checkpoint, a config the loop refuses. Ray Train's
``FailureConfig(max_failures)`` retries every worker error, so such an error would otherwise run the worker group
``max_failures`` more times, each loading the model (and its DeepSpeed engine) again to fail at the same point, and
print one traceback per rank and attempt. Instead:

- the worker that raises it records it in an :class:`ErrorBox` (a 0-CPU actor the driver made) before raising;
- a retried worker group finds it there and returns at once, without loading anything;
- the driver (``_fit``) raises the recorded error, with its one-line message.

A worker death or any other exception is retried as before (a replaced node, a transient fault).
"""

from __future__ import annotations

from collections.abc import Callable

from kcpt.errors import KcptError


class _Box:
    """The actor: the first KcptError a worker recorded, with the rank that raised it."""

    def __init__(self) -> None:
        self.error: KcptError | None = None
        self.rank: int | None = None

    def record(self, error: KcptError, rank: int) -> None:
        if self.error is None:
            self.error, self.rank = error, rank

    def get(self) -> tuple[KcptError | None, int | None]:
        return self.error, self.rank


class ErrorBox:
    """Driver-side handle (picklable: it travels to the workers in ``train_loop_config``)."""

    def __init__(self) -> None:
        import ray

        from kcpt.raystart import on_this_node

        # on the driver's node: a lost worker node must not take the box (and what it recorded) along
        self.actor = ray.remote(num_cpus=0)(_Box).options(**on_this_node()).remote()

    def record(self, error: KcptError, rank: int) -> None:
        """Worker side: record ``error`` (the first one recorded wins); waits until the actor has it."""
        import ray

        ray.get(self.actor.record.remote(error, rank))

    def recorded(self) -> tuple[KcptError | None, int | None]:
        """The recorded error and the rank that raised it, or ``(None, None)``."""
        import ray

        return ray.get(self.actor.get.remote())

    def close(self) -> None:
        import ray

        try:
            ray.kill(self.actor)
        except Exception:  # noqa: BLE001 - Ray already shut down: the actor is gone with it
            pass


def run_recording(box: ErrorBox | None, rank: int, body: Callable[[], None]) -> None:
    """Worker side: return at once when a KcptError was recorded by an earlier attempt; run ``body()``; record a
    KcptError it raises (then raise it: Ray Train ends this attempt)."""
    if box is None:
        body()
        return
    if box.recorded()[0] is not None:
        return
    try:
        body()
    except KcptError as e:
        box.record(e, rank)
        raise
