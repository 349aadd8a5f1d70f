"""Initial noise drawn piece by piece has the values of one whole draw, with bounded memory."""

import json
import os
import subprocess
import sys

import pytest
import torch

import headforcing_core.noise as noise_mod
from headforcing_core.noise import initial_noise, noise_frames, segment_noise

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# shapes: the real 16-channel layout (a multiple of 16 values per frame) and odd ones where
# rows share a 16-block and the whole draw ends with its recomputed tail block
SHAPES = [(1, 16, 4, 4), (1, 16, 20, 32), (2, 3, 1, 7), (1, 1, 3, 5), (1, 2, 1, 1), (3, 5, 2, 3)]


@pytest.mark.parametrize("b,c,h,w", SHAPES)
def test_every_frame_range_equals_the_whole_draw(b, c, h, w):
    def shape_of(n):
        return (b, c, n, h, w)

    for end in (1, 2, 3, 5, 9, 17):
        whole = initial_noise(shape_of(end), 7)
        for start in range(end):
            got = noise_frames(shape_of, 7, start, end)
            assert got.dtype == torch.float32 and got.shape == (b, c, end - start, h, w)
            assert torch.equal(got, whole[:, :, start:end]), (start, end)


@pytest.mark.parametrize("b,c,h,w", [(1, 16, 4, 4), (2, 3, 2, 6), (1, 1, 3, 5)])
def test_pieces_and_skips_larger_than_the_scratch(monkeypatch, b, c, h, w):
    monkeypatch.setattr(noise_mod, "CHUNK_VALUES", 32)  # many pieces per row, skips in several steps

    def shape_of(n):
        return (b, c, n, h, w)

    for end in (3, 7, 12):
        whole = initial_noise(shape_of(end), 3)
        for start in range(1, end):
            assert torch.equal(noise_frames(shape_of, 3, start, end), whole[:, :, start:end]), (start, end)


def test_seed_is_taken_modulo_2_64_like_comfyui():
    shape = (1, 16, 3, 2, 2)
    assert torch.equal(initial_noise(shape, 2**64 + 5), initial_noise(shape, 5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(initial_noise(shape, 5), torch.randn(shape, generator=g))


def test_a_story_draws_what_its_segments_draw_one_by_one():
    def shape_of(n):
        return (1, 16, n, 4, 6)

    frames = [3, 6, 3, 9, 3]
    story = segment_noise(lambda s, e: noise_frames(shape_of, 11, s, e), 0, frames)
    pos = 0
    for n in frames:
        # segment [pos, pos+n) starts from frames pos.. of a fresh run as long as the story up to its end
        assert torch.equal(story[:, :, pos:pos + n], initial_noise(shape_of(pos + n), 11)[:, :, pos:pos + n])
        pos += n


_PEAK = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from headforcing_core.noise import noise_frames, segment_noise

def status():
    out = {{}}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out

torch.randn(64)  # warm up
def shape_of(n):
    return (1, 16, n, 20, 32)   # 256x160
frames = [3] * 120
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                 # reset the peak to the current RSS
base = status()["VmRSS"]
story = segment_noise(lambda s, e: noise_frames(shape_of, 0, s, e), 0, frames)
peak = status()["VmHWM"] - base
print(json.dumps({{"peak": peak, "result": story.numel() * 4}}))
"""


def test_120_segment_story_noise_needs_its_own_size_not_the_square():
    """The defect: each segment drew the whole video so far (≈ 870 MiB for this story)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers go back to the OS at once
    out = subprocess.run([sys.executable, "-c", _PEAK.format(root=ROOT)], env=env, check=True, capture_output=True,
                         text=True, timeout=600)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    quadratic = sum(3 * (i + 1) for i in range(120)) * 16 * 20 * 32 * 4
    print(f"\n[memory] story noise peak {r['peak'] / 2**20:.1f} MiB for a {r['result'] / 2**20:.1f} MiB result "
          f"(whole-prefix draws would hold {quadratic / 2**20:.0f} MiB)")
    assert r["peak"] <= r["result"] + noise_mod.SCRATCH_BYTES + 8 * 2**20, r
