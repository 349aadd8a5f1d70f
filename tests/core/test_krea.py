"""Krea Realtime's loop (headforcing_core.krea) against its rules restated from Krea's code
(tests/core/krea_reference.py): the per-block trace and a dense run of a tiny 14B-shaped model."""

import pytest
import torch

from headforcing_core import random_backbone
from headforcing_core.errors import HeadForcingError, ShapeError
from headforcing_core.krea import (KreaError, KreaSettings, estimate_krea, generate_krea, plan_blocks,
                                   resolve_krea)
from headforcing_core.memory import GiB
from headforcing_core.noise import krea_generator, krea_initial_noise
from headforcing_core.prompts import PromptSchedule, PromptSegment, ScheduleError
from headforcing_core.schedule import FlowMatchSchedule, linspace_steps
from headforcing_core.backbone import BackboneSpec
from headforcing_core.wan_model import WAN21_14B

from .conftest import LAYOUT_14B, TINY, text_context
from .krea_reference import dense_krea, embedding_of, krea_trace, padded, sigma_table, step_list

pytestmark = pytest.mark.usefixtures("one_thread", "no_grad")


@pytest.fixture(scope="module")
def model14b():
    return random_backbone(LAYOUT_14B, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return random_backbone(TINY, seed=0)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


class ToyVAE:
    """A stand-in for Wan's causal VAE with the properties Krea's rule relies on: a streaming decode with
    state (each frame depends on the latent before it), 1 frame for the first latent and 4 for every other,
    and an encoder of one frame. ``decode_all`` decodes a whole prefix from scratch (the reference's view)."""

    def __init__(self):
        self.prev = None

    @staticmethod
    def _frames(lat, prev, first):
        out = []
        for sub in range(1 if first else 4):
            base = lat if prev is None else lat + 0.5 * prev
            out.append(torch.tanh(base * (1.0 + 0.1 * sub)) + 0.01 * sub)
        return out

    def decode(self, latents):  # [B, C, f, H, W] -> [B, F, C, H, W]
        frames = []
        for j in range(latents.shape[2]):
            lat = latents[:, :, j]
            frames += self._frames(lat, self.prev, self.prev is None)
            self.prev = lat
        return torch.stack(frames, dim=1)

    @staticmethod
    def encode(frame):  # [B, C, H, W] -> [B, C, 1, H, W]
        return (0.8 * frame + 0.05)[:, :, None]

    @classmethod
    def decode_all(cls, latents):
        return cls().decode(latents)


def run_ours(model, prompt, frames, seed, settings, vae=None, hw=(4, 4)):
    g = krea_generator(seed)
    noise = krea_initial_noise((1, 16, frames, *hw), g)
    return generate_krea(model, prompt, noise, g, settings, vae=vae), noise


def run_reference(model, trace, embeddings, noise, seed, settings, vae_cls=ToyVAE):
    g = krea_generator(seed)
    krea_initial_noise(noise.shape, g)  # the same draw, to put the generator where Krea's run is
    return dense_krea(model, trace, embeddings, noise.permute(0, 2, 1, 3, 4), g,
                      steps=step_list(len(settings.steps), settings.shift), shift=settings.shift,
                      f=settings.frames_per_block, decode_all=vae_cls.decode_all, encode=vae_cls.encode)


# ---------------------------------------------------------------------------------------------
# the step list


@pytest.mark.parametrize("n", [5, 4, 3])
def test_step_list_is_kreas(n):
    ours = FlowMatchSchedule.linspace(n, 5.0)
    assert ours.timesteps == pytest.approx(step_list(n, 5.0), rel=1e-6, abs=1e-4)
    assert ours.timesteps[-1] == 0.0
    sigma, tt = sigma_table(5.0)
    # the last step (timestep 0) converts its flow with the table's last sigma (1/1000 → ≈ 0.005), not 0
    assert ours.sigmas[-1] == pytest.approx(float(sigma[-1])) and ours.sigmas[-1] > 0.004
    assert linspace_steps(5) == (1000.0, 750.0, 500.0, 250.0, 0.0)
    assert linspace_steps(4) == (1000.0, 666.0, 333.0, 0.0)


# ---------------------------------------------------------------------------------------------
# the rules, block by block


@pytest.mark.parametrize("K", [2, 3, 4, 6])
@pytest.mark.parametrize("keep_first", [False, True])
def test_context_rule_matches_kreas_trace(K, keep_first):
    settings = KreaSettings(context_frames=K, first_latent="keep_first" if keep_first else "reencode")
    blocks = plan_blocks(12 * 3, settings)
    trace = krea_trace(12, K, ["a"] * 12, keep_first_frame=keep_first)
    for blk, entry in zip(blocks, trace):
        assert [(c.kind, c.index) for c in blk.context] == entry["context"], blk.index
        assert blk.rope_start == entry["start"]  # RoPE re-based: context at 0 … n−1, the block at n …
        assert blk.rope_start + blk.frames <= 21


def test_the_approximation_puts_the_latent_the_frame_came_from():
    exact = plan_blocks(30, KreaSettings())
    approx = plan_blocks(30, KreaSettings(first_latent="latent"))
    for e, a in zip(exact, approx):
        if e.context and e.context[0].kind == "pixel":
            # decoded frame 4·j is the last frame of latent j (Wan's VAE: 1 frame, then 4 per latent)
            assert a.context[0].kind == "latent" and 4 * a.context[0].index == e.context[0].index
            assert a.context[1:] == e.context[1:]
        else:
            assert a == e


def test_prompt_of_every_block_and_of_its_context_pass():
    """A change at block 3 (interpolated over 4 blocks), another at block 5 (mid-interpolation: a new one
    starts from the current embedding), and a return to a known prompt."""
    names = ["a"] * 3 + ["b"] * 2 + ["c"] * 6 + ["a"] * 3
    emb = {n: text_context(seed=i + 5) for i, n in enumerate("abc")}
    segs = []
    for n in names:
        if segs and segs[-1][0] == n:
            segs[-1][1] += 3
        else:
            segs.append([n, 3])
    sched = PromptSchedule(tuple(PromptSegment(emb[n], frames) for n, frames in segs))
    spec = BackboneSpec.from_config(TINY)
    req = resolve_krea(spec, sched, KreaSettings())
    trace = krea_trace(len(names), 3, names)
    assert req.switches == 3
    for b, entry in enumerate(trace):
        ours = padded(req.embeddings[b])
        assert torch.allclose(ours, embedding_of(entry["prompt"], emb), atol=1e-6), b
        if b:  # the context pass keeps the previous block's prompt
            assert torch.allclose(padded(req.embeddings[b - 1]), embedding_of(entry["context_prompt"], emb),
                                  atol=1e-6)
    # the first block after a change still has the old prompt; four blocks on, the new one
    assert torch.equal(req.embeddings[3], emb["a"]) and not torch.equal(req.embeddings[4], emb["a"])
    assert torch.equal(req.embeddings[6], emb["c"]) or torch.allclose(req.embeddings[8], emb["c"])


# ---------------------------------------------------------------------------------------------
# the dense reference: a tiny 14B-shaped model through the rebuild


def story(emb_a, emb_b, frames_a=9, frames_b=12):
    return PromptSchedule((PromptSegment(emb_a, frames_a), PromptSegment(emb_b, frames_b)))


def test_krea_loop_equals_dense_reference_14b_layout(model14b):
    """5 blocks (15 latent frames), a prompt change at block 2, Krea's re-encode through a (toy) VAE."""
    settings = KreaSettings()
    emb = {"a": text_context(seed=11), "b": text_context(seed=12, tokens=40)}
    ours, noise = run_ours(model14b, story(emb["a"], emb["b"], 6, 9), 15, 5, settings, vae=ToyVAE())
    trace = krea_trace(5, 3, ["a"] * 2 + ["b"] * 3)
    assert any(c[0] == "pixel" for e in trace for c in e["context"])  # the re-encode is exercised
    ref = run_reference(model14b, trace, emb, noise, 5, settings)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("settings", [
    KreaSettings(context_frames=4, first_latent="latent", steps=linspace_steps(4)),
    KreaSettings(context_frames=2, first_latent="keep_first", interpolation_blocks=2),
    KreaSettings(context_frames=6, shift=3.0),
], ids=["K4-latent-4steps", "K2-keep-first", "K6-shift3"])
def test_krea_loop_equals_dense_reference_settings(tiny, settings):
    emb = {"a": text_context(seed=21), "b": text_context(seed=22)}
    names = ["a"] * 3 + ["b"] * 3
    ours, noise = run_ours(tiny, story(emb["a"], emb["b"], 9, 9), 18, 8, settings, vae=ToyVAE(), hw=(8, 8))
    trace = krea_trace(6, settings.context_frames, names, interp_steps=settings.interpolation_blocks,
                       keep_first_frame=settings.first_latent == "keep_first")
    if settings.first_latent == "latent":  # our approximation: the latent the frame was decoded from
        for e in trace:
            e["context"] = [("latent", i // 4) if k == "pixel" else (k, i) for k, i in e["context"]]
    ref = run_reference(tiny, trace, emb, noise, 8, settings)
    assert rel_err(ours, ref) < 1e-5


def test_reference_is_sensitive(tiny):
    """Guards: the comparison can fail — the context pass with the block's own prompt, or the re-encode
    of another decoded frame, give another video."""
    settings = KreaSettings()
    emb = {"a": 4 * text_context(seed=21, tokens=512), "b": 4 * text_context(seed=22, tokens=512)}
    names = ["a"] * 3 + ["b"] * 3
    ours, noise = run_ours(tiny, story(emb["a"], emb["b"], 9, 9), 18, 8, settings, vae=ToyVAE(), hw=(8, 8))
    trace = krea_trace(6, 3, names)
    assert rel_err(ours, run_reference(tiny, trace, emb, noise, 8, settings)) < 1e-5
    wrong_prompt = [dict(e, context_prompt=e["prompt"]) for e in trace]
    assert rel_err(ours, run_reference(tiny, wrong_prompt, emb, noise, 8, settings)) > 1e-4
    wrong_frame = [dict(e, context=[(k, i + 1) if k == "pixel" else (k, i) for k, i in e["context"]])
                   for e in trace]
    assert rel_err(ours, run_reference(tiny, wrong_frame, emb, noise, 8, settings)) > 1e-3


# ---------------------------------------------------------------------------------------------
# bad input: refused before any model call


def test_context_past_the_trained_positions_is_refused(tiny):
    g = krea_generator(0)
    noise = krea_initial_noise((1, 16, 9, 4, 4), g)
    with pytest.raises(KreaError, match="trained on 21 latent frames.*at most 18 context frames"):
        generate_krea(tiny, text_context(), noise, g, KreaSettings(context_frames=19, first_latent="latent"))


def test_reencode_without_a_vae_is_refused(tiny):
    g = krea_generator(0)
    noise = krea_initial_noise((1, 16, 9, 4, 4), g)
    with pytest.raises(KreaError, match="needs a VAE"):
        generate_krea(tiny, text_context(), noise, g, KreaSettings())


def test_segments_must_change_between_blocks(tiny):
    g = krea_generator(0)
    noise = krea_initial_noise((1, 16, 9, 4, 4), g)
    with pytest.raises(ScheduleError, match="segment 1 has 4 latent frames.*multiple of 3"):
        generate_krea(tiny, story(text_context(seed=1), text_context(seed=2), 4, 5), noise, g,
                      KreaSettings(first_latent="latent"))


@pytest.mark.parametrize("bad, match", [
    (dict(context_frames=0), "at least 1 latent frame"),
    (dict(first_latent="pixels"), "unknown first_latent"),
    (dict(interpolation_blocks=0), "at least 1 block"),
    (dict(steps=(1000, 1000)), "strictly decrease"),
])
def test_bad_settings(bad, match):
    with pytest.raises(HeadForcingError, match=match):
        KreaSettings(**bad).validate()


def test_steps_zero_only_last():
    with pytest.raises(ShapeError):
        FlowMatchSchedule((0,))
    assert FlowMatchSchedule((1000, 750, 500, 250, 0)).timesteps[-1] == 0.0


# ---------------------------------------------------------------------------------------------
# memory


def test_estimate_composes_the_rebuilt_cache_and_kreas_terms():
    spec = BackboneSpec.from_config(WAN21_14B)
    est = estimate_krea(spec, KreaSettings(), latent_frames=240, latent_height=60, latent_width=104)
    per_frame = 40 * 2 * 1560 * 5120 * 2  # K and V of one latent frame, all layers, bf16
    assert est.kv_bytes == 6 * per_frame  # 3 context frames + one block of 3
    assert est.extra_bytes >= 9 * 3 * 480 * 832 * 4  # the nine decoded frames kept for the re-encode
    assert est.run_bytes < 10 * GiB
    longer = estimate_krea(spec, KreaSettings(), latent_frames=480, latent_height=60, latent_width=104)
    assert longer.kv_bytes == est.kv_bytes  # the cache does not grow with the video
    with_vae = estimate_krea(spec, KreaSettings(), latent_frames=240, latent_height=60, latent_width=104,
                             vae_dtype=torch.bfloat16)
    # the VAE's streaming cache stays on the device between blocks (≈ 1.8 GiB in bf16 at 832x480); its decode and
    # encode run while no KV cache is held, so at 14B they add nothing to the peak
    assert 1.6 * GiB < with_vae.run_bytes - est.run_bytes < 2.0 * GiB
    assert with_vae.peak_phase == "run"


def test_bench_estimate_row(capsys):
    import json

    from headforcing_core.bench import main
    assert main(["--estimate", "--model-shape", "14b", "--seconds", "60", "--loop", "krea",
                 "--policy", "self_forcing_window", "--weights-dtype", "fp8"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["results"]["60s"]["policies"]["krea"]
    assert row["kv_bytes"] == 6 * 40 * 2 * 1560 * 5120 * 2
    # fp8: one byte a parameter (14,288,491,584), the patch embedding's 332,800 in float32
    assert report["weights_bytes"] == row["weights_bytes"] == 14_288_491_584 + 3 * 332_800
    # Krea's loop with fp8 weights and the VAE's state fits a 32 GB card (90 % of it), not a 24 GB one
    assert row["total_bytes"] == row["run_bytes"] + row["weights_bytes"]
    assert 0.9 * 24 * GiB < row["total_bytes"] < 0.9 * 32 * GiB
