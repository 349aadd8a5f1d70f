"""nodes/messages.py on its own (no server, no browser): the head-map payload and the sampler panel."""
from __future__ import annotations

import base64
import importlib.util
import io
import math
import sys

import pytest

from .conftest import REPO, PLANTED_HEADS, PLANTED_LAYERS, planted_types

torch = pytest.importorskip("torch")


def _messages():
    name = "hf_nodes_messages"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "nodes" / "messages.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


M = _messages()


def _planted_profile():
    from headforcing_core.policies import HeadLabels
    from headforcing_core.profiling import HeadProfile

    labels = {t: HeadLabels(t, tuple(tuple(r) for r in planted_types(t)), "planted") for t in
              ("head_forcing", "pyramid_forcing")}
    model = {"dim": 512, "num_heads": PLANTED_HEADS, "num_layers": PLANTED_LAYERS, "patch_size": [1, 2, 2],
             "in_dim": 16, "out_dim": 16, "text_dim": 4096}
    return HeadProfile(model=model, labels_by_taxonomy=labels, taxonomy="head_forcing", source="planted")


def test_head_map_payload_of_a_labels_only_profile():
    p = M.head_map_payload(_planted_profile())
    assert (p["layers"], p["heads"], p["taxonomy"]) == (PLANTED_LAYERS, PLANTED_HEADS, "head_forcing")
    assert [[p["types"][c] for c in row] for row in p["labels"]] == planted_types("head_forcing")
    other = p["other"]["pyramid_forcing"]
    assert [[other["types"][c] for c in row] for row in other["labels"]] == planted_types("pyramid_forcing")
    assert p["stats"] is None and p["counts"] == {"local": 8, "anchor": 8, "memory": 8}
    assert p["colors"]["local"] == "#e87e22" and set(p["colors"]) >= {"local", "anchor", "memory", "wave", "veil"}
    assert M.head_map_ui(_planted_profile())[M.HEAD_MAP_KEY][0] == p
    assert M.head_map_ui(object()) == {}, "a broken profile loses the drawing, never the node"


def test_head_map_payload_with_measured_statistics():
    from headforcing_core import WanConfig, random_backbone
    from headforcing_core.profiling import profile_heads

    bb = random_backbone(WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512), seed=0)
    prof = profile_heads(bb, [torch.randn(1, 8, 4096) * 0.1], frames=6, latent_height=4, latent_width=4, seed=0,
                         query_samples=8)
    p = M.head_map_payload(prof)
    assert p["stats"] is not None
    for key, _label in M.HOVER_STATS:
        grid = p["stats"][key]
        assert len(grid) == 2 and len(grid[0]) == 2
        assert all(v is None or math.isfinite(v) for row in grid for v in row)
    masses = [p["stats"][k][1][1] for k in ("sink_mass", "middle_mass", "recent_mass", "current_mass")]
    assert all(m is None or 0 <= m <= 1 for m in masses)


class _Format:  # a latent format with Wan-like 16-channel latent->RGB factors
    latent_rgb_factors = [[0.1 * ((c + k) % 3 - 1) for k in range(3)] for c in range(16)]
    latent_rgb_factors_bias = [0.0, 0.1, -0.1]


def test_sampler_panel_sends_one_event_per_chunk():
    sent = []
    send = lambda node, payload: sent.append((node, payload)) or True  # noqa: E731
    with M.live_panel("7", send=send) as panel:
        M.describe_run(total_latent_frames=12, frames_per_block=3, policy="head_forcing", latent_format=_Format(),
                       segments=[("a cat", 6), ("a dog", 6)], kv_bytes_at=lambda n: 1000 * min(n, 9),
                       kv_budget_bytes=9000, width=64, height=48)
        for _ in range(4):
            M.chunk_done(torch.randn(1, 16, 3, 6, 8))
        assert M.current_panel() is panel
    assert M.current_panel() is None
    kinds = [p["kind"] for _, p in sent]
    assert kinds == ["start", "chunk", "chunk", "chunk", "chunk", "done"]
    chunks = [p for _, p in sent if p["kind"] == "chunk"]
    assert [p["chunk"] for p in chunks] == [1, 2, 3, 4] and {p["chunks"] for p in chunks} == {4}
    assert [p["seconds_done"] for p in chunks] == pytest.approx([9 / 16, 21 / 16, 33 / 16, 45 / 16], abs=1e-3)
    assert chunks[-1]["seconds_total"] == pytest.approx(45 / 16, abs=1e-3)
    assert [p["segment"] for p in chunks] == [1, 1, 2, 2]
    assert [p["prompt"] for p in chunks] == ["a cat", "a cat", "a dog", "a dog"]
    assert [p["kv_bytes"] for p in chunks] == [3000, 6000, 9000, 9000]
    assert all(node == "7" for node, _ in sent)
    jpeg = base64.b64decode(chunks[0]["preview"].split(",", 1)[1])
    from PIL import Image
    im = Image.open(io.BytesIO(jpeg))
    assert im.format == "JPEG" and max(im.size) == M.PREVIEW_MAX_SIDE and im.size == (192, 144)


def test_every_chunk_brings_its_frames_and_follows_a_live_switch():
    """One JPEG per latent frame (the chunk's own frames, in order), each 0.25 s of video; the report's
    previews line; a live switch relabels the rest of the run."""
    sent = []
    with M.live_panel("7", send=lambda node, payload: sent.append(payload) or True):
        M.describe_run(total_latent_frames=9, frames_per_block=3, latent_format=_Format(),
                       segments=[("a cat", 9)], live={"text": True, "segments": ["a cat"]})
        x0 = torch.zeros(1, 16, 3, 6, 8)
        x0[:, :, 1] = 3.0  # the middle frame bright, the others not
        M.chunk_done(x0)
        M.live_switched(3, "a dog")
        M.chunk_done(torch.randn(1, 16, 3, 6, 8))
        M.chunk_done(torch.randn(1, 16, 2, 6, 8))  # a short last chunk: two frames
        line = M.preview_report()
    chunks = [p for p in sent if p["kind"] == "chunk"]
    assert [len(p["frames"]) for p in chunks] == [3, 3, 2] and {p["frame_seconds"] for p in chunks} == {0.25}
    assert all(p["preview"] == p["frames"][-1] and p["live"]["text"] for p in chunks)
    import numpy as np
    from PIL import Image
    means = [int(np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("L"), dtype=np.int64)
                 .sum()) for u in chunks[0]["frames"]]
    assert means[1] != means[0] == means[2], "the frames are the chunk's own, in order"
    assert [(p["segment"], p["segments"], p["prompt"], p["segment_live"]) for p in chunks] == [
        (1, 1, "a cat", False), (2, 2, "a dog", True), (2, 2, "a dog", True)]
    assert line.startswith("previews: 2.66667 frames per chunk (latent→RGB, ≤ 192 px)") and "for 3 chunks" in line
    assert M.preview_report() == ""  # no panel: no line


def test_sampler_panel_never_breaks_a_run():
    def boom(node, payload):
        raise RuntimeError("socket gone")
    # a failing transport, a failing KV function and a latent the previewer cannot read
    with M.live_panel("1", send=lambda n, p: M.send_progress(n, p)):
        M.describe_run(total_latent_frames=3, frames_per_block=3, kv_bytes_at=lambda n: 1 / 0,
                       latent_format=_Format())
        M.chunk_done(torch.randn(1, 4, 3, 2, 2))
    with M.live_panel("1", send=boom):
        M.describe_run(total_latent_frames=3, frames_per_block=3)
        M.chunk_done(torch.randn(1, 16, 3, 2, 2))
    assert M.send_progress("1", {"x": 1}) is False  # no server here


def test_sampler_panel_reports_a_stopped_run():
    sent = []
    with pytest.raises(KeyError):
        with M.live_panel("3", send=lambda n, p: sent.append(p) or True):
            M.describe_run(total_latent_frames=9, frames_per_block=3)
            M.chunk_done(torch.randn(1, 16, 3, 2, 2))
            raise KeyError("interrupted")
    assert [p["kind"] for p in sent] == ["start", "chunk", "stopped"]
    # without describe_run or chunks (an error before sampling) nothing is sent
    sent.clear()
    with pytest.raises(ValueError):
        with M.live_panel("3", send=lambda n, p: sent.append(p) or True):
            raise ValueError("width 100 is not a multiple of 16")
    assert sent == []
