"""Video geometry: frames, seconds, latent frames and chunks — the one owner of these rules.

Self Forcing, Causal Forcing and LongLive (Wan2.1) make 16-fps video through the Wan 2.1 VAE:
8×8 pixels per latent cell and 4 video frames per latent frame, except the first (T latent frames
decode to 4T−3 video frames). The diffusion model patches 2×2 latent cells into a token, so a
width or height must be a multiple of 16 pixels. The AR sampler makes chunks of
``frames_per_block`` latent frames; every chunk takes one model call per denoising step plus the
clean pass.
"""

from __future__ import annotations

import math

FPS = 16  # Self Forcing / Causal Forcing / Wan 2.1 frame rate
TIME_COMPRESSION = 4  # Wan 2.1 VAE: one latent frame = 4 video frames (the first: 1)
SPACE_COMPRESSION = 8  # Wan 2.1 VAE: 8×8 pixels per latent cell
SIZE_MULTIPLE = 16  # VAE 8× and the model's 2×2 patches
# The longest video anything here plans: the AR sampler node's `length` limit (1,000,000 s, about 11.6
# days) in latent frames. Past it sizes stop being numbers a tensor can have (a "1e308 | a fox" line).
MAX_VIDEO_SECONDS = 1_000_000
MAX_LATENT_FRAMES = MAX_VIDEO_SECONDS * FPS // TIME_COMPRESSION + 1  # 16·s + 1 video frames


def latent_frames_for(video_frames: int) -> int:
    """Latent frames that hold ``video_frames`` frames (ComfyUI's Wan rule): ``(frames - 1) // 4 + 1``."""
    return (int(video_frames) - 1) // TIME_COMPRESSION + 1


def video_frames_for(latent_frames: int) -> int:
    """Video frames VAEDecode makes from ``latent_frames``: ``4T - 3`` (0 for none)."""
    return max(0, TIME_COMPRESSION * int(latent_frames) - 3)


def added_video_frames(latent_frames: int) -> int:
    """Video frames ``latent_frames`` more latent frames add to a video (a continuation): ``4T``."""
    return TIME_COMPRESSION * int(latent_frames)


def video_frames_for_seconds(seconds: float) -> int:
    """Video frames of a new ``seconds``-long video at 16 fps: the first frame plus 16 per second
    (5 s → 81 frames, Wan's convention)."""
    return round(seconds * FPS) + 1


def latent_frames_for_seconds(seconds: float) -> int:
    """Latent frames that *add* ``seconds`` of video at 16 fps: 4 per second (at least 1) — the
    rule of a continuation (:func:`added_video_frames`) and of the benchmark's lengths."""
    return max(1, round(seconds * FPS / TIME_COMPRESSION))


def seconds_of(latent_frames: int) -> float:
    """Seconds of video ``latent_frames`` decode to."""
    return video_frames_for(latent_frames) / FPS


def seconds_to_chunked_frames(seconds: float, frames_per_block: int, fps: float = FPS) -> int:
    """Latent frames for ``seconds`` of video, rounded to whole chunks (at least one chunk).

    One latent frame is 4 video frames; at 16 fps a second is 4 latent frames, so 5 s with
    3-frame chunks → 20 → 21 latent frames.
    """
    latent = seconds * fps / TIME_COMPRESSION
    chunks = max(1, math.floor(latent / frames_per_block + 0.5))
    return chunks * frames_per_block


def chunk_bounds(start_frame: int, num_frames: int, frames_per_block: int) -> list[tuple[int, int]]:
    """(first frame, frames) of every chunk; the last one may be shorter."""
    if frames_per_block < 1:
        raise ValueError(f"frames per block must be ≥ 1, got {frames_per_block}")
    return [(s, min(frames_per_block, start_frame + num_frames - s))
            for s in range(start_frame, start_frame + num_frames, frames_per_block)]


def model_calls(num_frames: int, frames_per_block: int, steps: int, first_steps: int | None = None) -> int:
    """Model calls to make ``num_frames`` new frames: ``steps + 1`` per chunk (the clean pass included),
    ``first_steps + 1`` for the first chunk when it has its own step list."""
    chunks = len(chunk_bounds(0, num_frames, frames_per_block))
    calls = chunks * (steps + 1)
    return calls + (first_steps - steps if first_steps is not None and chunks else 0)
