"""Ray Train's ``DataConfig`` for ``data.loader: ray_data``: each training source split over the step's *reading*
ranks only (:func:`kcpt.train.layout.readers`).

Ray's own ``DataConfig`` splits a dataset over every worker. On an elastic run's world whose worker count does not
divide the step's micro-batches, the spare ranks read nothing (they run padding micro-batches), so their parts
would go unread; here ranks ``0 … a-1`` get the ``a`` parts of ``streaming_split(a, equal=True)`` and a spare rank
gets ``None`` (it never asks for a shard). Imported only where Ray Train is (``ray.train`` costs ~1 s to import).
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig

from kcpt.train.layout import readers


class ReadersDataConfig(DataConfig):
    """``DataConfig(**kwargs)`` whose splits go to the ``readers(micro_batches, world_size)`` first ranks;
    ``micro_batches`` None: every rank reads (Ray's own split)."""

    def __init__(self, micro_batches: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.micro_batches = micro_batches

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: list[Any] | None,
                  worker_node_ids: list[Any] | None, **kwargs: Any) -> list[dict[str, Any]]:
        a = readers(self.micro_batches, world_size)
        out = super().configure(datasets, a, worker_handles[:a] if worker_handles else worker_handles,
                                worker_node_ids[:a] if worker_node_ids else worker_node_ids, **kwargs)
        return [*out, *({name: None for name in datasets} for _ in range(world_size - a))]
