"""Wan's 3-D rotary position embedding, applied at attention time.

Each head's ``head_dim`` channels form ``head_dim/2`` rotation pairs (adjacent
channels, as in Wan's complex view) split over (time, height, width) as
``c - 2·(c//3), c//3, c//3`` pairs (44/42/42 channels for 128-wide heads).
The angle of a pair is ``position · theta^(-2i/d_axis)``.

Unlike Wan's 1024-entry lookup table we compute angles from (possibly
fractional) positions, so pooled entries can sit at the centroid of the tokens
they summarise and re-encoded entries at any time index. For integer positions
below 1024 this is Wan's table exactly.

Keys are stored un-roped; a head group's retained entries are rotated at read
time with whatever time indices its policy's RoPE mode assigns.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

ROPE_THETA = 10000.0
WAN_ROPE_TABLE_LEN = 1024


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs per axis (t, h, w)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


@lru_cache(maxsize=16)
def inverse_frequencies(head_dim: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis inverse frequencies (float64), matching Wan's ``rope_params``."""
    out = []
    for pairs in axis_pairs(head_dim):
        axis_dim = 2 * pairs
        out.append(1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim))
    return tuple(out)  # type: ignore[return-value]


@lru_cache(maxsize=64)
def spatial_positions(grid_h: int, grid_w: int, pool: int = 1) -> torch.Tensor:
    """``[tokens, 2]`` float64 (h, w) positions of a frame's tokens, row-major.

    With ``pool > 1`` the positions are the centroids of the ``pool×pool``
    windows used by :func:`pool_tokens` (clipped at the border), so a pooled
    entry is rotated where the tokens it averages were.
    """
    hh = torch.arange(grid_h, dtype=torch.float64).view(grid_h, 1).expand(grid_h, grid_w)
    ww = torch.arange(grid_w, dtype=torch.float64).view(1, grid_w).expand(grid_h, grid_w)
    grid = torch.stack([hh, ww])  # [2, h, w]
    if pool > 1:
        grid = F.avg_pool2d(grid.unsqueeze(0), pool, ceil_mode=True).squeeze(0)
    return grid.flatten(1).T.contiguous()


def pooled_grid(grid_h: int, grid_w: int, pool: int) -> tuple[int, int]:
    return -(-grid_h // pool), -(-grid_w // pool)


def pool_tokens(x: torch.Tensor, grid_h: int, grid_w: int, pool: int) -> torch.Tensor:
    """Average ``pool×pool`` spatial windows of a frame: ``[B, h·w, H, D]`` → ``[B, h'·w', H, D]``."""
    if pool == 1:
        return x
    b, s, n, d = x.shape
    assert s == grid_h * grid_w, (s, grid_h, grid_w)
    grid = x.permute(0, 2, 3, 1).reshape(b * n * d, 1, grid_h, grid_w)
    pooled = F.avg_pool2d(grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid,
                          pool, ceil_mode=True).to(x.dtype)
    ph, pw = pooled.shape[-2:]
    return pooled.reshape(b, n, d, ph * pw).permute(0, 3, 1, 2)


class Rotary:
    """Angles for a sequence of tokens; rotates ``[B, S, heads, head_dim]`` tensors."""

    def __init__(self, angles: torch.Tensor):
        self.angles = angles  # [S, head_dim/2] float64
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_positions(cls, head_dim: int, times: torch.Tensor, spatial: torch.Tensor) -> "Rotary":
        """``times``: ``[S]`` float; ``spatial``: ``[S, 2]`` (h, w) float."""
        ft, fh, fw = inverse_frequencies(head_dim)
        t = times.to(torch.float64).unsqueeze(1)
        angles = torch.cat([t * ft, spatial[:, :1].double() * fh, spatial[:, 1:].double() * fw], dim=1)
        return cls(angles)

    @classmethod
    def for_entries(cls, head_dim: int, times: list[float], grid_h: int, grid_w: int, pool: int = 1) -> "Rotary":
        """Tokens of consecutive entries of one spatial layout, entry ``i`` at time ``times[i]``."""
        spatial = spatial_positions(grid_h, grid_w, pool)
        per = spatial.shape[0]
        t = torch.tensor(times, dtype=torch.float64).repeat_interleave(per)
        return cls.from_positions(head_dim, t, spatial.repeat(len(times), 1))

    @staticmethod
    def concat(parts: list["Rotary"]) -> "Rotary":
        return Rotary(torch.cat([p.angles for p in parts], dim=0))

    def __len__(self) -> int:
        return self.angles.shape[0]

    def _cos_sin(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, device)
        if key not in self._cache:
            a = self.angles.to(device)
            self._cache[key] = (torch.cos(a).to(dtype)[:, None, :], torch.sin(a).to(dtype)[:, None, :])
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (``[B, S, heads, head_dim]``); computed in float32 (float64 for float64 input)."""
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self._cos_sin(compute, x.device)
        pairs = x.to(compute).unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
        return out.to(x.dtype)
