"""Measure the memory a run allocates, on any device: live bytes of every storage an op makes.

:class:`AllocationTracker` is a ``TorchDispatchMode``. Every ATen op dispatched inside it is
looked at after it runs: each tensor it returns whose storage is new — not one of its inputs'
storages (a view, an in-place op) and not already counted — is counted with its storage's
size until Python frees that storage (a ``weakref.finalize`` on the storage object, which
PyTorch keeps alive exactly as long as the storage). Tensors made before the tracker starts
(weights, inputs) are never counted; what a kernel allocates and frees inside one op (its own
scratch) is not seen. The result is the peak of the live bytes over the run and over each
named phase (:meth:`AllocationTracker.phase`), with the largest allocations live at the peak
and the op that made each.

On a CPU this is the only way to see a run's peak; on CUDA ``torch.cuda.max_memory_allocated``
measures the same thing from the allocator (see ``headforcing_core.bench --memory``).
"""

from __future__ import annotations

import heapq
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .counters import _op_name

TOP_ALLOCATIONS = 12  # largest live allocations kept for the report at the peak


@dataclass
class PhasePeak:
    """Peak live bytes inside one phase, and the live bytes when it was first entered."""

    peak: int = 0
    entered_with: int = 0
    calls: int = 0


@dataclass
class Allocation:
    nbytes: int
    op: str
    phase: str
    shape: tuple[int, ...]
    dtype: str
    ref: weakref.ref | None = field(default=None, repr=False, compare=False)


@dataclass
class AllocationTracker(TorchDispatchMode):
    """``with AllocationTracker() as t: …`` then ``t.peak``, ``t.phases``, ``t.at_peak`` (largest live
    allocations when the peak was reached). ``device``: count only storages on this device type
    (None: every device)."""

    device: str | None = None
    live: int = 0
    peak: int = 0
    phases: dict[str, PhasePeak] = field(default_factory=dict)
    at_peak: list[Allocation] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()
        self._alive: dict[int, Allocation] = {}  # id(storage) -> what it is, while the storage lives
        self._stack: list[str] = []

    # ---- phases ---------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str):
        """Attribute allocations to ``name`` and record the peak reached while it runs."""
        rec = self.phases.setdefault(name, PhasePeak())
        if rec.calls == 0:
            rec.entered_with = self.live
        rec.calls += 1
        rec.peak = max(rec.peak, self.live)
        self._stack.append(name)
        try:
            yield rec
        finally:
            self._stack.pop()

    @property
    def current_phase(self) -> str:
        return self._stack[-1] if self._stack else ""

    # ---- counting -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in _tensors(out):
            if self.device is not None and t.device.type != self.device:
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._alive:
                continue
            if inputs is None:  # views and in-place ops return an input's storage: not an allocation
                inputs = {id(a.untyped_storage()) for a in _tensors((args, kwargs))}
            if key in inputs:
                continue
            nbytes = storage.nbytes()
            if nbytes == 0:
                continue
            # the weak reference's callback runs when the storage is freed; it lives as long as the record
            self._alive[key] = Allocation(nbytes, _op_name(func), self.current_phase, tuple(t.shape),
                                          str(t.dtype).replace("torch.", ""),
                                          weakref.ref(storage, lambda _, key=key: self._free(key)))
            self._grow(nbytes)
        return out

    def _grow(self, nbytes: int) -> None:
        self.live += nbytes
        for name in self._stack:
            rec = self.phases[name]
            rec.peak = max(rec.peak, self.live)
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = heapq.nlargest(TOP_ALLOCATIONS, self._alive.values(), key=lambda a: a.nbytes)

    def _free(self, key: int) -> None:
        alloc = self._alive.pop(key, None)
        if alloc is not None:
            self.live -= alloc.nbytes

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        # storages still alive stay counted in ``live`` (they belong to the run's results); later frees
        # no longer matter to this tracker
        for alloc in self._alive.values():
            alloc.ref = None
        self._alive = {}
        return out

    def report(self) -> dict:
        """JSON-able summary: peak, live at the end, each phase's peak, and the largest allocations at the peak."""
        return {
            "peak_bytes": self.peak,
            "live_bytes_at_end": self.live,
            "phases": {name: {"peak_bytes": p.peak, "entered_with_bytes": p.entered_with, "calls": p.calls}
                       for name, p in self.phases.items()},
            "largest_at_peak": [{"bytes": a.nbytes, "op": a.op, "phase": a.phase, "shape": list(a.shape),
                                 "dtype": a.dtype} for a in self.at_peak],
        }


def _tensors(x):
    """The dense tensors in an op's arguments or result (tensors, and lists / tuples / dicts of them)."""
    if isinstance(x, torch.Tensor):
        if x.layout == torch.strided and x.device.type != "meta":
            yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)
