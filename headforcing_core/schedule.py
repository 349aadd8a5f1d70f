"""The flow-matching schedule of Self Forcing, in one place.

Self Forcing builds a 1000-entry table with ``extra_one_step`` and ``sigma_min = 0``::

    s_i     = 1 - i / 1000                      (i = 0 … 999)
    sigma_i = shift·s_i / (1 + (shift - 1)·s_i)
    t_i     = 1000 · sigma_i

and *warps* the nominal denoising steps through it: nominal step ``n`` becomes
``t_table[1000 - n]`` (so ``[1000, 750, 500, 250]`` → ≈ ``[1000, 937.5, 833.33, 625]``
for ``shift = 5``). The model predicts a flow ``v``; ``x0 = x_t - sigma_t·v`` with
``sigma_t`` looked up at the nearest table timestep in float64, and the next
noisy input is ``(1 - sigma_next)·x0 + sigma_next·noise``. The committed "clean
pass" runs at timestep 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ShapeError

SELF_FORCING_STEPS = (1000, 750, 500, 250)
SELF_FORCING_SHIFT = 5.0


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Warped flow-matching steps for few-step AR sampling."""

    steps: tuple[float, ...] = SELF_FORCING_STEPS
    shift: float = SELF_FORCING_SHIFT
    num_train_timesteps: int = 1000
    warp: bool = True
    _sigma_table: torch.Tensor = field(init=False, repr=False, compare=False)
    _t_table: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        n = self.num_train_timesteps
        steps = tuple(float(s) for s in self.steps)
        if not steps:
            raise ShapeError("the schedule needs at least one denoising step")
        if any(not (1 <= s <= n) for s in steps):  # the warp looks nominal steps up in an n-entry table
            raise ShapeError(f"denoising steps must lie in [1, {n}], got {list(steps)}")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ShapeError(f"denoising steps must strictly decrease, got {list(steps)}")
        if self.shift <= 0:
            raise ShapeError(f"shift must be positive, got {self.shift}")
        object.__setattr__(self, "steps", steps)
        s = 1.0 - torch.arange(n, dtype=torch.float64) / n
        sigma = self.shift * s / (1.0 + (self.shift - 1.0) * s)
        object.__setattr__(self, "_sigma_table", sigma)
        object.__setattr__(self, "_t_table", sigma * n)

    @property
    def timesteps(self) -> tuple[float, ...]:
        """The timesteps actually passed to the model, one per denoising step."""
        if not self.warp:
            return self.steps
        n = self.num_train_timesteps
        return tuple(float(self._t_table[int(round(n - s))]) for s in self.steps)

    def sigma(self, t: float) -> float:
        """Sigma of the table entry nearest to timestep ``t`` (float64)."""
        idx = int(torch.argmin((self._t_table - float(t)).abs()))
        return float(self._sigma_table[idx])

    def to_x0(self, x_t: torch.Tensor, flow: torch.Tensor, t: float) -> torch.Tensor:
        """Clean estimate from a flow prediction, computed in float64."""
        sigma = self.sigma(t)
        x0 = x_t.to(torch.float64) - sigma * flow.to(torch.float64)
        return x0.to(x_t.dtype)

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """Forward-noise ``x0`` to timestep ``t``: ``(1 - sigma)·x0 + sigma·noise``."""
        sigma = self.sigma(t)
        out = (1.0 - sigma) * x0.to(torch.float64) + sigma * noise.to(torch.float64)
        return out.to(x0.dtype)
