"""Read back a saved video with PyAV (``av``, which ComfyUI itself requires)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def read_video(path) -> tuple[np.ndarray, int, int]:
    """Decode every frame: ``(frames [N, H, W, 3] uint8 RGB, width, height)``."""
    import av

    path = Path(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        return np.zeros((0, height, width, 3), np.uint8), width, height
    return np.stack(frames), width, height


def video_info(path) -> dict:
    """Container-level facts: codec, frame rate, duration (s), pixel format."""
    import av

    with av.open(str(path)) as container:
        s = container.streams.video[0]
        return {
            "format": container.format.name,
            "codec": s.codec_context.name,
            "fps": float(s.average_rate) if s.average_rate else None,
            "pix_fmt": s.codec_context.pix_fmt,
            "duration_s": float(container.duration / 1e6) if container.duration else None,
            "metadata": dict(container.metadata),
        }
