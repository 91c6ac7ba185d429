"""Count the operations that make the host wait for the device (device→host syncs) — on any device.

On a GPU every one of these blocks the Python thread until the queued kernels finish; on the CPU they are free,
so they are counted by what they are, not by timing:

- ``aten._local_scalar_dense`` — ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` / ``if t:``;
- ``aten.equal``, ``aten.is_nonzero``, ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*`` and boolean-mask
  indexing (``t[mask]``): outputs whose size depends on device values;
- ``Tensor.tolist()`` and ``Tensor.numpy()`` (no dispatcher op on the CPU; a copy to the host on a GPU);
- copies of a non-CPU tensor to the CPU.

``SyncCounter`` is a ``TorchDispatchMode``: it sees every op run on the thread (also inside autograd's backward on
the CPU). ``ignore()`` excludes a region (e.g. an optimizer whose step counters are host tensors by design:
non-fused, non-capturable torch AdamW keeps ``step`` on the CPU, so its ``.item()`` is no device sync on a GPU).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_SYNC_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.nonzero.default,
             aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
             aten.unique_dim.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._ignored = 0
        self._patched: list[tuple[str, Any]] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _hit(self, name: str) -> None:
        if not self._ignored:
            self.counts[name] += 1

    @contextlib.contextmanager
    def ignore(self) -> Iterator[None]:
        self._ignored += 1
        try:
            yield
        finally:
            self._ignored -= 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self._hit(str(func.overloadpacket.__name__))
        elif func is aten.index.Tensor and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] if len(args) > 1 else [])):
            self._hit("index_bool_mask")
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[0] if func is aten._to_copy.default else args[1]
            dst_dev = kwargs.get("device") if func is aten._to_copy.default else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_dev is not None \
                    and torch.device(dst_dev).type == "cpu":
                self._hit("to_cpu")
        return func(*args, **kwargs)

    def __enter__(self) -> SyncCounter:
        counter = self
        for name in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, name)

            def wrapped(t: torch.Tensor, *a: Any, _orig: Any = orig, _name: str = name, **k: Any) -> Any:
                counter._hit(_name)
                with counter.ignore():
                    return _orig(t, *a, **k)

            self._patched.append((name, orig))
            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, orig in self._patched:
            setattr(torch.Tensor, name, orig)
        self._patched.clear()
