"""Wan's 3-D rotary position embedding, applied at attention time.

Each head's ``head_dim`` channels form ``head_dim/2`` rotation pairs (adjacent channels,
as in Wan's complex view) split over (time, height, width) as ``c - 2·(c//3), c//3,
c//3`` pairs (44/42/42 channels for 128-wide heads). The angle of a pair is
``position · theta^(-2i/d_axis)``.

Unlike Wan's 1024-entry lookup table we compute angles (in float64) from possibly
fractional positions, so pooled entries can sit where their tokens were and re-encoded
entries at any time. For integer positions below 1024 this is Wan's table exactly.

Keys are stored un-roped; the plan rotates a head group's retained entries once per
chunk (:func:`rotate_entries`: the time angle per entry, the spatial angles per token),
and the chunk's queries and keys once per model call (:class:`ChunkRotation`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

ROPE_THETA = 10000.0


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
def spatial_positions(grid_h: int, grid_w: int, pool: int = 1, placement: str = "centroid") -> torch.Tensor:
    """``[tokens, 2]`` float64 (h, w) positions of a frame's tokens, row-major.

    With ``pool > 1`` one position per ``pool×pool`` window of :func:`pool_tokens`:
    ``centroid`` — the mean position of the tokens it averages (clipped at the border);
    ``top_left`` — its first token (Pyramid Forcing's merged tokens: ``(2·py, 2·px)``).
    """
    hh = torch.arange(grid_h, dtype=torch.float64).view(grid_h, 1).expand(grid_h, grid_w)
    ww = torch.arange(grid_w, dtype=torch.float64).view(1, grid_w).expand(grid_h, grid_w)
    grid = torch.stack([hh, ww])  # [2, h, w]
    if pool > 1:
        if placement == "top_left":
            grid = grid[:, ::pool, ::pool]
        elif placement == "centroid":
            grid = F.avg_pool2d(grid.unsqueeze(0), pool, ceil_mode=True).squeeze(0)
        else:
            raise ValueError(f"unknown pooled token placement {placement!r}")
    return grid.flatten(1).T.contiguous()


def pooled_grid(grid_h: int, grid_w: int, pool: int) -> tuple[int, int]:
    return -(-grid_h // pool), -(-grid_w // pool)


def pool_tokens(x: torch.Tensor, grid_h: int, grid_w: int, pool: int) -> torch.Tensor:
    """Average ``pool×pool`` spatial windows of frames: ``[..., h·w, D]`` → ``[..., h'·w', D]``.

    Windows cut by the border average the tokens they hold. Computed in float32 for
    half-precision input.
    """
    if pool == 1:
        return x
    *lead, s, d = x.shape
    assert s == grid_h * grid_w, (s, grid_h, grid_w)
    grid = x.reshape(-1, grid_h, grid_w, d).permute(0, 3, 1, 2)
    work = grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid
    pooled = F.avg_pool2d(work, pool, ceil_mode=True).to(x.dtype)
    return pooled.flatten(2).transpose(1, 2).reshape(*lead, -1, d)


def _angles(head_dim: int, times: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """``[S, head_dim/2]`` float64 angles of tokens at ``times`` ``[S]`` and ``spatial`` ``[S, 2]``."""
    ft, fh, fw = (f.to(times.device) for f in inverse_frequencies(head_dim))
    t = times.to(torch.float64).unsqueeze(1)
    return torch.cat([t * ft, spatial[:, :1].double() * fh, spatial[:, 1:].double() * fw], dim=1)


def _factors(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel factors of pair angles ``[..., D/2]``: ``(cos, cos)`` and ``(-sin, sin)`` interleaved, ``[..., D]``."""
    c, s = torch.cos(angles), torch.sin(angles)
    return (torch.stack([c, c], dim=-1).flatten(-2).to(dtype), torch.stack([-s, s], dim=-1).flatten(-2).to(dtype))


def _rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the adjacent channel pairs of ``x`` ``[..., D]``: ``(x0·c - x1·s, x1·c + x0·s)``, computed in
    the factors' dtype and stored in ``x``'s (or into ``out``, any strided view of the result's shape).

    Plain multiplies and one add, each exactly rounded, so the result does not depend on the
    tensor's layout (a vectorised complex multiply may fuse differently): keys rotated at commit
    time and keys rotated when a chunk is planned are bit-identical. Half-precision ``x`` is
    multiplied as it is (type promotion widens it exactly) and the sum is rounded once on store,
    which is the arithmetic of widening first and casting after, in three passes fewer.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    if out is None and x.dtype == cos2.dtype:
        return x * cos2 + swapped * sin2
    shape = _broadcast(x.shape, cos2.shape)
    if out is None:
        out = x.new_empty(shape)
    elif tuple(out.shape) != shape:  # out= would be resized (with a warning), leaving the caller's view unwritten
        raise ValueError(f"rotation of {tuple(x.shape)} by {tuple(cos2.shape)} is {shape}, not {tuple(out.shape)}")
    return torch.add(x * cos2, swapped * sin2, out=out)


def _broadcast(*shapes) -> tuple[int, ...]:
    """The broadcast of compatible shapes (torch.broadcast_shapes checks more, in Python, per call)."""
    n = max(len(sh) for sh in shapes)
    padded = [(1,) * (n - len(sh)) + tuple(sh) for sh in shapes]
    return tuple(max(sizes) for sizes in zip(*padded))


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of ``x`` by angles with ``cos``/``sin`` ``[..., D/2]`` (reference form)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = x.to(compute).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def rope_reference(x: torch.Tensor, times: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """Rotate tokens ``x`` ``[B, S, H, D]`` at ``times`` ``[S]`` / ``spatial`` ``[S, 2]`` (float64 angles)."""
    a = _angles(x.shape[-1], times, spatial)
    return _apply(x, torch.cos(a)[:, None, :], torch.sin(a)[:, None, :])


class ChunkRotation:
    """The rotation of a chunk's tokens (frames ``times[v][j]`` of variant ``v``), built once per chunk.

    ``apply(x)``: ``x`` ``[..., S, H, D]`` rotated with variant 0 (queries, and keys wherever the
    chunk sits at its own frames); ``apply_all(x)``: every variant, ``[B, V, S, H, D]``. Computed
    in float32 (float64 for float64 input).
    """

    def __init__(self, head_dim: int, grid: tuple[int, int], variants: list[tuple[float, ...]],
                 dtype: torch.dtype, device: torch.device):
        gh, gw = grid
        sp = spatial_positions(gh, gw)
        per = sp.shape[0]
        angles = []
        for times in variants:
            t = torch.tensor(times, dtype=torch.float64).repeat_interleave(per)
            angles.append(_angles(head_dim, t, sp.repeat(len(times), 1)))
        a = torch.stack(angles)[:, :, None, :]  # [V, S, 1, D/2]
        self.compute = torch.float64 if dtype == torch.float64 else torch.float32
        cos2, sin2 = _factors(a, self.compute)
        self.cos2, self.sin2 = cos2.to(device), sin2.to(device)  # moved once per chunk
        self.variants = len(variants)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _rotate(x, self.cos2[0], self.sin2[0], out)

    def apply_all(self, x: torch.Tensor) -> torch.Tensor:
        if self.variants == 1:
            return self.apply(x).unsqueeze(1)
        return _rotate(x.unsqueeze(1), self.cos2, self.sin2)


_SPATIAL_FACTORS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _spatial_factors(spatial: torch.Tensor, head_dim: int, device: torch.device, dtype: torch.dtype):
    """Rotation factors of the (h, w) channels of tokens at ``spatial`` ``[T, 2]`` (memoised)."""
    key = (spatial.data_ptr(), tuple(spatial.shape), head_dim, str(device), dtype)
    f = _SPATIAL_FACTORS.get(key)
    if f is None:
        _, fh, fw = inverse_frequencies(head_dim)
        a = torch.cat([spatial[:, :1].double() * fh, spatial[:, 1:].double() * fw], dim=1)
        f = tuple(t.to(device) for t in _factors(a, dtype))
        if len(_SPATIAL_FACTORS) > 256:
            _SPATIAL_FACTORS.clear()
        _SPATIAL_FACTORS[key] = f
    return f


_TIME_FREQUENCIES: dict[tuple, torch.Tensor] = {}


def _time_frequencies(head_dim: int, device: torch.device) -> torch.Tensor:
    """The time axis's inverse frequencies on ``device`` (memoised: moved there once)."""
    key = (head_dim, str(device))
    f = _TIME_FREQUENCIES.get(key)
    if f is None:
        f = _TIME_FREQUENCIES[key] = inverse_frequencies(head_dim)[0].to(device)
    return f


def rotate_entries(x: torch.Tensor, times: torch.Tensor | float, spatial: torch.Tensor, *,
                   inverse: bool = False) -> torch.Tensor:
    """Rotate retained entries: ``x`` ``[..., E, T, D]`` whose entry ``e`` sits at ``times[..., e]``
    (broadcastable to ``x.shape[:-2]``; a number: every entry at that time, nothing moved to the device)
    and whose tokens sit at ``spatial`` ``[T, 2]`` (a memoised :func:`spatial_positions` table).
    ``inverse`` undoes that rotation (keys stored rotated, pooled from their raw values).

    The time angle is per entry and the spatial angles per token, so no per-token table of
    the whole history is built: the time channels and the spatial channels are rotated apart
    (with the same arithmetic as :class:`ChunkRotation`, so the results are bit-identical).
    """
    d = x.shape[-1]
    pt, _, _ = axis_pairs(d)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    ft = _time_frequencies(d, x.device)
    if isinstance(times, torch.Tensor):
        ta = times.to(x.device, torch.float64).unsqueeze(-1).unsqueeze(-1) * ft  # [..., E, 1, pt]
    else:
        ta = (ft * float(times)).view(1, 1, -1)
    t_cos, t_sin = _factors(ta, compute)
    s_cos, s_sin = _spatial_factors(spatial, d, x.device, compute)
    if inverse:
        t_sin, s_sin = -t_sin, -s_sin
    out = x.new_empty(_broadcast(x.shape[:-1], t_cos.shape[:-1], s_cos.shape[:-1]) + (d,))
    _rotate(x[..., :2 * pt], t_cos, t_sin, out[..., :2 * pt])  # time channels, then the spatial ones
    _rotate(x[..., 2 * pt:], s_cos, s_sin, out[..., 2 * pt:])
    return out
