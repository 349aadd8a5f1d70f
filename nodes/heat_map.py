"""The heat-map PNG of a head profile: layers × heads, one colour per head type, a legend with counts.

Drawn with PIL (ComfyUI ships it; the core never needs PIL) in the palette of
:data:`nodes.messages.TYPE_COLORS`, the same colours the browser's interactive head map uses.
The profile nodes (``nodes/profiling.py``) output it as their ``heat_map`` IMAGE.
"""
from __future__ import annotations

import numpy as np
import torch

from headforcing_core.policies import HeadLabels

from .messages import TYPE_COLORS

TYPE_MEANING = {
    "local": "detail, recent frames",
    "anchor": "sink frames",
    "memory": "long-range memory",
    "wave": "periodic in time",
    "veil": "sink + adjacent frames",
    "all": "",
}
PYRAMID_MEANING = {"anchor": "broad long-range context"}
TITLES = {"head_forcing": "Head Forcing heads", "pyramid_forcing": "Pyramid Forcing heads", "uniform": "heads"}


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ascii(text: str) -> str:
    """PIL's default font lacks some symbols."""
    return text.replace("×", "x").replace("→", "->").replace("—", "-")


def render_heat_map(labels: HeadLabels, subtitle: str = "") -> torch.Tensor:
    """IMAGE ``[1, H, W, 3]`` in [0, 1]: rows = layers, columns = heads, one colour per type,
    a legend with per-type counts and shares."""
    from PIL import Image, ImageDraw

    layers, heads = labels.shape
    cell = int(np.clip(560 // max(layers, heads), 8, 40))
    font, small = _font(15), _font(max(9, min(13, cell - 2)))
    left, top = 44, 56
    grid_w, grid_h = heads * cell, layers * cell
    legend_w = 300
    counts = labels.counts()
    total = layers * heads
    width = left + grid_w + 24 + legend_w
    height = max(top + grid_h + 30, top + 28 * (len(counts) + 2))
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.text((10, 8), TITLES.get(labels.taxonomy, labels.taxonomy), fill=(20, 20, 20), font=_font(18))
    if subtitle:
        d.text((10, 32), _ascii(subtitle)[:90], fill=(90, 90, 90), font=small)
    rgb = np.zeros((layers, heads, 3), dtype=np.uint8)
    for li, row in enumerate(labels.types):
        for hi, t in enumerate(row):
            rgb[li, hi] = TYPE_COLORS.get(t, (0, 0, 0))
    block = np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))
    if cell >= 6:  # thin white grid lines
        block[::cell, :, :] = 250
        block[:, ::cell, :] = 250
    img.paste(Image.fromarray(block), (left, top))
    d.rectangle([left - 1, top - 1, left + grid_w, top + grid_h], outline=(60, 60, 60))
    step_l = 1 if layers <= 12 else 5
    for li in range(0, layers, step_l):
        d.text((6, top + li * cell + max(0, (cell - 12) // 2)), f"L{li}", fill=(60, 60, 60), font=small)
    step_h = 1 if cell >= 18 else 2
    for hi in range(0, heads, step_h):
        d.text((left + hi * cell + 2, top + grid_h + 4), f"{hi}", fill=(60, 60, 60), font=small)
    d.text((left + grid_w - 40, top + grid_h + 16), "head ->", fill=(90, 90, 90), font=small)
    x0 = left + grid_w + 24
    y = top
    d.text((x0, y), f"{layers} layers x {heads} heads = {total}", fill=(20, 20, 20), font=font)
    y += 28
    for t, n in counts.items():
        d.rectangle([x0, y, x0 + 18, y + 18], fill=TYPE_COLORS.get(t, (0, 0, 0)), outline=(60, 60, 60))
        meaning = PYRAMID_MEANING.get(t) if labels.taxonomy == "pyramid_forcing" and t in PYRAMID_MEANING \
            else TYPE_MEANING.get(t, "")
        d.text((x0 + 26, y), f"{t}: {n} ({100.0 * n / total:.0f} %)", fill=(20, 20, 20), font=font)
        if meaning:
            d.text((x0 + 26, y + 16), meaning, fill=(100, 100, 100), font=small)
        y += 38
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
