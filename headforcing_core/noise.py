"""Initial noise, drawn piece by piece with the values of one whole draw.

A run of ``T`` latent frames starts from ``initial_noise((B, C, T, H, W), seed)``: float32 normal
noise from a CPU generator seeded ``seed`` (what ComfyUI's ``prepare_noise`` draws for an empty
latent of that shape). Prompt schedules and continuations need *frames* ``[s, e)`` of the
draw a run of ``e`` frames would make (:func:`segment_noise`).
Drawing all ``e`` frames to keep ``e - s`` of them costs memory that grows with the video;
:func:`noise_frames` returns exactly the same values while holding only the requested frames
and a fixed scratch buffer.

Why this is exact. PyTorch's CPU ``randn`` for a contiguous float32 tensor of ``n ≥ 16`` values
first takes one 32-bit draw of the generator per value, in memory order, then turns every
aligned block of 16 uniforms into 16 normals (Box-Muller); when ``n`` is not a multiple of 16
the last 16 values are recomputed from 16 further draws. So value ``i`` depends only on the
generator's position and on ``i``'s block of 16: drawing the same stream in pieces whose
boundaries fall on multiples of 16 gives the same values, and positions not needed are skipped
by taking (and dropping) the same number of 32-bit draws. ``tests/core/test_noise.py`` checks
this bit for bit against whole draws.
"""

from __future__ import annotations

from typing import Callable

import torch

MAX_SEED = 0xFFFFFFFFFFFFFFFF
CHUNK_VALUES = 1 << 20  # scratch of the piecewise draw: 4 MiB of float32 (and as much for skipping)
SCRATCH_BYTES = 2 * 4 * CHUNK_VALUES


def seed_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) & MAX_SEED)


def initial_noise(shape, seed: int) -> torch.Tensor:
    """The starting noise of a run: float32 on the CPU, bit-identical to
    ``comfy.sample.prepare_noise(torch.zeros(shape), seed)``, from a private generator."""
    return torch.randn(tuple(shape), generator=seed_generator(seed), dtype=torch.float32, device="cpu")


def _skip(g: torch.Generator, draws: int) -> None:
    """Advance ``g`` by ``draws`` 32-bit draws (what as many float32 uniforms would take)."""
    scratch = None
    while draws > 0:
        n = min(draws, CHUNK_VALUES)
        if scratch is None or scratch.numel() < n:
            scratch = torch.empty(n, dtype=torch.int32)
        scratch[:n].random_(generator=g)  # one 32-bit draw per int32 value
        draws -= n


def noise_frames(shape_of: Callable[[int], tuple], seed: int, start: int, end: int) -> torch.Tensor:
    """Frames ``[start, end)`` of ``initial_noise(shape_of(end), seed)``, without drawing the rest.

    ``shape_of(n)`` is the latent shape ``[B, C, n, H, W]`` of ``n`` frames. Memory: the result
    plus :data:`SCRATCH_BYTES`; time: that of the whole draw.
    """
    shape = tuple(int(s) for s in shape_of(end))
    if len(shape) != 5 or shape[2] != end or not 0 <= start < end:
        raise ValueError(f"noise_frames: frames [{start}, {end}) of a latent of shape {shape}")
    b, c, t, h, w = shape
    hw = h * w
    total = b * c * t * hw
    if start == 0 or total < 16:
        whole = initial_noise(shape, seed)
        return whole if start == 0 else whole[:, :, start:end].clone()
    rows = b * c
    out = torch.empty((b, c, end - start, h, w), dtype=torch.float32)
    flat = out.view(rows, (end - start) * hw)
    main = total - total % 16  # values made from their own 16-block; the rest come from the tail draw
    g = seed_generator(seed)
    pos = 0  # generator position in 32-bit draws (= flat index inside the main region)
    vals, vals_at = None, 0  # the last piece drawn and its first flat index
    for r in range(rows):
        a, z = (r * t + start) * hw, (r * t + end) * hw  # this row's wanted flat range
        z_main = min(z, main)
        lo16, hi16 = a - a % 16, min(-(-z_main // 16) * 16, main)
        if lo16 >= hi16:
            continue
        if lo16 < pos:  # the row starts inside the block the previous row ended in: already drawn
            lo, hi = max(a, lo16), min(z_main, pos)
            flat[r, lo - a:hi - a] = vals[lo - vals_at:hi - vals_at]
            p = pos
        else:
            _skip(g, lo16 - pos)
            p = lo16
        while p < hi16:
            n = min(CHUNK_VALUES, hi16 - p)
            vals, vals_at = torch.randn(n, generator=g, dtype=torch.float32), p
            lo, hi = max(a, p), min(z_main, p + n)
            if hi > lo:
                flat[r, lo - a:hi - a] = vals[lo - p:hi - p]
            p += n
        pos = max(pos, hi16)
    if total % 16:
        # the whole draw recomputes its last 16 values from the 16 draws after its end
        tail0 = total - 16
        wanted = [(r, max(tail0, (r * t + start) * hw), (r * t + end) * hw) for r in range(rows)]
        wanted = [(r, lo, hi) for r, lo, hi in wanted if hi > lo]
        if wanted:
            _skip(g, total - pos)
            tail = torch.randn(16, generator=g, dtype=torch.float32)
            for r, lo, hi in wanted:
                a = (r * t + start) * hw
                flat[r, lo - a:hi - a] = tail[lo - tail0:hi - tail0]
    return out


def segment_noise(draw, start_frame: int, frames: list[int]) -> torch.Tensor:
    """Initial noise of consecutive segments, the same whether they are sampled in one run or one by one.

    ``draw(s, e)`` returns frames ``[s, e)`` of the noise a fresh run of ``e`` latent frames
    starts from (``[B, C, e - s, H, W]``; :func:`noise_frames` draws them
    without the rest). The segment covering absolute frames ``[s, e)`` gets ``draw(s, e)``: a
    single segment from frame 0 is exactly a fresh run's noise, and sampling segments one by one
    (Continue) draws what one run of the whole schedule draws. Memory: the result and one
    segment's draw, whatever the number of segments.
    """
    out, pos = None, start_frame
    for n in frames:
        part = draw(pos, pos + n)
        if len(frames) == 1:
            return part
        if out is None:
            out = part.new_empty((*part.shape[:2], sum(frames), *part.shape[3:]))
        out[:, :, pos - start_frame:pos - start_frame + n] = part
        pos += n
    return out


# ---------------------------------------------------------------------------------------------
# Krea Realtime's draws

def krea_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The one generator of a Krea run: ``torch.Generator(device).manual_seed(seed)`` (``release_server.py``
    ``GenerationSession.__init__``: ``self.rnd``, on the GPU the server runs on)."""
    return torch.Generator(device=device).manual_seed(int(seed) & MAX_SEED)


def krea_initial_noise(shape, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Krea run's initial noise, all of it drawn first: ``torch.randn([B, T, C, H, W], dtype, generator)``
    (``GenerationSession.__init__``: ``self.noise``, in the model's dtype) returned in ComfyUI's layout
    ``shape = [B, C, T, H, W]`` (a view; block ``b`` reads frames ``3b … 3b + 2`` of it)."""
    b, c, t, h, w = (int(s) for s in shape)
    return torch.randn((b, t, c, h, w), generator=generator, device=generator.device, dtype=dtype).permute(0, 2, 1, 3, 4)


def krea_renoise(shape, generator: torch.Generator | None, like: torch.Tensor, *,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh re-noising draw between two denoising steps, Krea's way (``generate_block_internal``:
    ``torch.randn(denoised_pred.flatten(0, 1).shape, generator=self.rnd, dtype=torch.bfloat16)``): frames
    before channels (``[B·f, C, H, W]``), in ``dtype`` (the model's), from the run's one generator;
    returned as ``[B, C, f, H, W]`` in ``like``'s device and dtype. The sampler's ``draw_renoise``."""
    b, c, f, h, w = (int(s) for s in shape)
    device = generator.device if generator is not None else like.device
    eps = torch.randn((b, f, c, h, w), generator=generator, device=device, dtype=dtype or like.dtype)
    return eps.permute(0, 2, 1, 3, 4).to(like.device, like.dtype)
