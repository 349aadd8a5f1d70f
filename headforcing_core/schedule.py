"""The flow-matching schedule of Self Forcing, in one place.

Self Forcing builds a 1000-entry table with ``extra_one_step`` and ``sigma_min = 0``::

    s_i     = 1 - i / 1000                      (i = 0 … 999)
    sigma_i = shift·s_i / (1 + (shift - 1)·s_i)
    t_i     = 1000 · sigma_i

and *warps* the nominal denoising steps through it, padded with a trailing 0
(``torch.cat((scheduler.timesteps, [0]))`` in Self Forcing's pipeline and Krea Realtime's server):
nominal step ``n`` becomes ``t_padded[1000 - n]`` (so ``[1000, 750, 500, 250]`` → ≈
``[1000, 937.5, 833.33, 625]`` for ``shift = 5``, and a nominal ``0`` is timestep 0). The model
predicts a flow ``v``; ``x0 = x_t - sigma_t·v`` with ``sigma_t`` looked up at the nearest entry of the
1000-entry table (the padding is not in it: timestep 0 gets the last entry's sigma, 1/1000 → ≈ 0.005
at shift 5) in float64, and the next noisy input is ``(1 - sigma_next)·x0 + sigma_next·noise``. The
committed "clean pass" runs at timestep 0.

Krea Realtime's step list is a named constructor, :meth:`FlowMatchSchedule.linspace` (its
``v2v.py`` ``get_denoising_schedule``): ``n`` nominal steps ``linspace(1000, 0, n)``, the last one 0.

Every timestep and sigma a run uses is computed once, as Python floats, when the
schedule is made: the sampling loop does no table look-ups (and so no host/device
round trips).
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
    _sigma_table: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _t_table: tuple[float, ...] = field(init=False, repr=False, compare=False)
    timesteps: tuple[float, ...] = field(init=False, compare=False)
    sigmas: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        n = self.num_train_timesteps
        try:
            steps = tuple(float(s) for s in self.steps)
        except (TypeError, ValueError):
            raise ShapeError(f"denoising steps must be numbers, got {self.steps!r}") from None
        if not steps:
            raise ShapeError("the schedule needs at least one denoising step")
        if any(not (0 <= s <= n) for s in steps):  # the warp looks nominal steps up in the padded table
            raise ShapeError(f"denoising steps must lie in [0, {n}], got {list(steps)}")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ShapeError(f"denoising steps must strictly decrease, got {list(steps)}")
        if steps[0] <= 0:
            raise ShapeError(f"the first denoising step must be above 0 (0 is a clean timestep), got {list(steps)}")
        if not (self.shift > 0):
            raise ShapeError(f"shift must be positive, got {self.shift}")
        object.__setattr__(self, "steps", steps)
        s = 1.0 - torch.arange(n, dtype=torch.float64) / n
        sigma = self.shift * s / (1.0 + (self.shift - 1.0) * s)
        object.__setattr__(self, "_sigma_table", tuple(sigma.tolist()))
        object.__setattr__(self, "_t_table", tuple((sigma * n).tolist()))
        padded = self._t_table + (0.0,)  # the warp's table ends with timestep 0 (nominal step 0)
        ts = tuple(padded[int(round(n - x))] for x in steps) if self.warp else steps
        object.__setattr__(self, "timesteps", ts)
        object.__setattr__(self, "sigmas", tuple(self.sigma(t) for t in ts))

    @classmethod
    def linspace(cls, num_steps: int, shift: float = SELF_FORCING_SHIFT, strength: float = 1.0,
                 num_train_timesteps: int = 1000) -> "FlowMatchSchedule":
        """Krea Realtime's schedule: :func:`linspace_steps` warped like any step list."""
        return cls(linspace_steps(num_steps, strength, num_train_timesteps), shift, num_train_timesteps)

    def sigma(self, t: float) -> float:
        """Sigma of the table entry nearest to timestep ``t`` (float64; the first on ties)."""
        table = self._t_table
        idx = min(range(len(table)), key=lambda i: abs(table[i] - float(t)))
        return self._sigma_table[idx]

    def to_x0(self, x_t: torch.Tensor, flow: torch.Tensor, step: int) -> torch.Tensor:
        """Clean estimate from the flow predicted at denoising step ``step``, computed in float64."""
        x0 = x_t.to(torch.float64) - self.sigmas[step] * flow.to(torch.float64)
        return x0.to(x_t.dtype)

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """Forward-noise ``x0`` to denoising step ``step``: ``(1 - sigma)·x0 + sigma·noise``."""
        sigma = self.sigmas[step]
        out = (1.0 - sigma) * x0.to(torch.float64) + sigma * noise.to(torch.float64)
        return out.to(x0.dtype)


def linspace_steps(num_steps: int, strength: float = 1.0, num_train_timesteps: int = 1000) -> tuple[float, ...]:
    """Krea Realtime's nominal step list (``v2v.py`` ``get_denoising_schedule``, called by
    ``release_server.py`` ``GenerationSession.__init__``): ``torch.linspace(strength·1000, 0, n)`` in
    float32, truncated to integers (``.to(torch.long)``) — 5 steps: ``1000, 750, 500, 250, 0``; 4 steps:
    ``1000, 666, 333, 0``. Warped through the zero-padded table, the last one is timestep 0."""
    n = int(num_steps)
    if n < 2:
        raise ShapeError(f"Krea's step list needs at least 2 steps (the last one is timestep 0), got {num_steps}")
    if not (0.0 < float(strength) <= 1.0):
        raise ShapeError(f"strength must lie in (0, 1], got {strength}")
    nominal = torch.linspace(float(strength) * num_train_timesteps, 0, n, dtype=torch.float32).to(torch.long)
    return tuple(float(v) for v in nominal.tolist())
