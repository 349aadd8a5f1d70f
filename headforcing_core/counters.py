"""Count ATen ops, and the ops that would make the host wait for the device, on any device.

:class:`OpCounter` is a ``TorchDispatchMode``: every ATen op dispatched inside it is
counted by name. An op is *sync-prone* when, on CUDA, it makes the host wait for the
device or moves data from the host in the middle of the work:

* reading a device value back: ``_local_scalar_dense`` (``.item()``, ``int(t)``,
  ``.tolist()``, Python ``if tensor``), ``equal``, ``is_nonzero``;
* output sizes that depend on values: ``nonzero``, ``masked_select``, ``unique*``,
  ``repeat_interleave`` without ``output_size``;
* tensors made from host data: ``lift_fresh`` / ``lift_fresh_copy`` (``torch.tensor(...)``,
  indexing with a Python list), copies whose source is a CPU tensor and whose
  destination is not.

On a CPU-only machine the same code dispatches the same ops, so the counts taken there
tell what a CUDA run would do (host → device copies show up as ``lift_fresh`` of the
index or value tensors the code builds).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_PRONE = {
    "_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "lift_fresh", "lift_fresh_copy",
}


def _op_name(func) -> str:
    return func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: …`` then ``c.total``, ``c.sync``, ``c.ops`` (Counter by op name)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.sync_ops: Counter = Counter()
        self.enabled = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled:
            name = _op_name(func)
            self.ops[name] += 1
            if name in SYNC_PRONE or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                      and len(args) > 1 and isinstance(args[1], torch.Tensor)) \
                    or (name in ("_to_copy", "copy_") and _host_to_device(func, args, kwargs)):
                self.sync_ops[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def sync(self) -> int:
        return sum(self.sync_ops.values())


def _host_to_device(func, args, kwargs) -> bool:
    name = _op_name(func)
    if name == "copy_" and len(args) >= 2:
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst.device.type != "cpu"
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        dev = kwargs.get("device")
        return args[0].device.type == "cpu" and dev is not None and torch.device(dev).type != "cpu"
    return False
