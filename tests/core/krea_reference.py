"""Krea Realtime's loop restated from its code, independently of ``headforcing_core``.

Two parts, written from ``krea-ai/realtime-video`` ``release_server.py`` (``GenerationSession``) and
sharing nothing with the core's Krea module, sampler, cache, plan, RoPE or schedule:

* :func:`krea_trace` — the session's bookkeeping, block by block, as its code does it: the latents and
  decoded frames it holds (a ``deque`` of decoded-frame numbers with ``maxlen = 1 + (K − 1)·4``),
  ``get_clean_context_frames``' slices, ``model_input_start_frame``, the step list
  (``timesteps[1000 − linspace(...).long()]`` over the zero-padded table) and the prompt embedding of
  every block and of its context pass (``interpolate_prompt_embeds`` / ``pop(0)`` and the
  cross-attention cache's ``is_init`` flag).
* :func:`dense_krea` — the run itself with a dense forward: for every denoising call of a block, one
  forward of ``[context latents at t = 0 ; the block at t]`` at positions ``0 … n+f−1`` with a mask
  that is block-causal in 3-frame chunks over the context and lets the block see everything (the
  context's K/V in that pass are those of Krea's ``recompute_kv_cache`` call); the context's tokens
  use the previous block's prompt, the block's its own.
"""

from __future__ import annotations

from collections import deque

import torch

from .dense_reference import dense_forward, text_kv


# ---------------------------------------------------------------------------------------------
# the session's rules


def step_list(num_steps: int, shift: float, strength: float = 1.0) -> list[float]:
    """``get_denoising_schedule(zero_padded_timesteps, strength, steps)``: ``init_models`` builds
    ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000, training=True)``
    and pads its timesteps with a 0."""
    sig = torch.linspace(1.0, 0.0, 1001)[:-1]  # float32, as the scheduler makes it
    sig = shift * sig / (1 + (shift - 1) * sig)
    padded = torch.cat([sig * 1000, torch.tensor([0.0])])
    nominal = torch.linspace(strength * 1000, 0, num_steps, dtype=torch.float32).to(torch.long)
    return [float(t) for t in padded[1000 - nominal]]


def sigma_table(shift: float):
    """The scheduler's sigmas and timesteps (no padding: ``_convert_flow_pred_to_x0`` and ``add_noise`` look
    the nearest timestep up in these 1000 entries), in float64."""
    s = 1.0 - torch.arange(1000, dtype=torch.float64) / 1000
    sigma = shift * s / (1 + (shift - 1) * s)
    return sigma, sigma * 1000


def krea_trace(num_blocks: int, K: int, prompts_by_block: list[str], interp_steps: int = 4,
               keep_first_frame: bool = False, f: int = 3) -> list[dict]:
    """Per block: ``context`` (what ``get_clean_context_frames`` returns, as ``("latent", i)`` /
    ``("pixel", i)`` entries), ``start`` (``model_input_start_frame``), ``prompt`` (the block's embedding
    as ``(old, new, weight)`` of prompt names) and ``context_prompt`` (the embedding the cross-attention
    cache holds during the context pass). ``prompts_by_block``: the prompt the client has sent when each
    block starts (a change arrives between blocks, as ``ws_session`` handles it)."""
    all_latents: list[int] = []  # latent frame numbers made so far
    frame_context_cache: deque[int] = deque(maxlen=1 + (K - 1) * 4)
    decoded = 0
    current = ("", prompts_by_block[0], 1.0)  # (old, new, weight): the embedding lerp(old, new, weight)
    interpolated: list[tuple] = []
    crossattn = None  # the embedding the cross-attention cache was built from (None: not is_init)
    prompt = prompts_by_block[0]
    trace = []
    for block_idx in range(num_blocks):
        if prompts_by_block[block_idx] != prompt:  # ws_session: interpolate_prompt_embeds(new, interp_steps)
            prompt = prompts_by_block[block_idx]
            weights = torch.linspace(0, 1, steps=interp_steps).tolist()
            interpolated = [(current, prompt, w) for w in weights]
        current_start_frame = block_idx * f
        # recompute_kv_cache
        if block_idx == 0:
            context, start = [], current_start_frame
        else:
            start = min(current_start_frame, K)
            clean = list(all_latents[:current_start_frame])
            if keep_first_frame or (block_idx - 1) * f < K:
                ctx = clean[:1] if K == 1 else clean[:1] + clean[1:][-K + 1:]
                context = [("latent", i) for i in ctx]
            else:
                tail = clean[1:][-K + 1:] if K > 1 else []  # (Krea's [-0:] would be every latent)
                context = [("pixel", frame_context_cache[0])] + [("latent", i) for i in tail]
        context_prompt = crossattn  # the context pass reads the cross-attention cache as it is
        if block_idx > 0 and crossattn is None:
            context_prompt = crossattn = current
        # generate_block_internal: pop an interpolated embedding (and reset the cross-attention cache)
        if interpolated:
            crossattn = None
            current = interpolated.pop(0)
        if crossattn is None:
            crossattn = current
        trace.append({"block": block_idx, "context": context, "start": start, "prompt": crossattn,
                      "context_prompt": context_prompt})
        all_latents.extend(range(current_start_frame, current_start_frame + f))
        n_new = 1 + 4 * (f - 1) if decoded == 0 else 4 * f  # Wan's causal VAE: 1 frame, then 4 per latent
        frame_context_cache.extend(range(decoded, decoded + n_new))
        decoded += n_new
    return trace


def padded(t: torch.Tensor, length: int = 512) -> torch.Tensor:
    """``WanTextEncoder.forward``: the umT5 output is 512 tokens, zero after the prompt."""
    return torch.cat([t, t.new_zeros(t.shape[0], length - t.shape[1], t.shape[2])], 1)


def embedding_of(entry, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (512-token) tensor of a trace's ``(old, new, weight)`` (old may itself be such a triple)."""
    old, new, w = entry
    b = padded(embeddings[new])
    if w == 1.0 and not isinstance(old, tuple):
        return b
    a = embedding_of(old, embeddings) if isinstance(old, tuple) else padded(embeddings[old])
    return torch.lerp(a, b, torch.tensor(w, dtype=a.dtype))


# ---------------------------------------------------------------------------------------------
# the dense run


def dense_krea(m, trace: list[dict], embeddings: dict[str, torch.Tensor], noise_bthw, generator, *, steps,
               shift: float, f: int = 3, decode_all=None, encode=None):
    """Krea's run, block by block, every call a dense forward (module docstring). ``noise_bthw``: the initial
    noise as Krea draws it, ``[B, T, C, H, W]``; re-noising draws ``[B·f, C, H, W]`` from ``generator``.
    ``decode_all(latents [B, C, T, H, W]) -> [B, 4T−3, …]`` decodes a whole prefix (a causal decoder's
    frames do not depend on what comes after), ``encode(frame) -> [B, C, 1, H, W]``."""
    sigma, tt = sigma_table(shift)

    def sig(t):
        return float(sigma[torch.argmin((tt - t).abs())])

    b, total, c, hh, ww = noise_bthw.shape
    out = torch.zeros(b, c, total, hh, ww, dtype=noise_bthw.dtype)
    kv_cache = {}

    def kv(entry):
        key = repr(entry)
        if key not in kv_cache:
            kv_cache[key] = text_kv(m, embedding_of(entry, embeddings), out.dtype)
        return kv_cache[key]

    for entry in trace:
        blk = entry["block"]
        s0 = blk * f
        parts = []
        for kind, i in entry["context"]:
            if kind == "latent":
                parts.append(out[:, :, i:i + 1])
            else:
                frames = decode_all(out[:, :, :s0])
                parts.append(encode(frames[:, i]).to(out.dtype))
        ctx = torch.cat(parts, dim=2) if parts else out[:, :, :0]
        n = ctx.shape[2]
        assert n == entry["start"]
        texts = [kv(entry["prompt"])]
        if n:
            texts.append(kv(entry["context_prompt"]))
        chunk_of_frame = [i // f for i in range(n)] + [(n + f - 1) // f] * f
        text_of_frame = [1] * n + [0] * f
        x = noise_bthw[:, s0:s0 + f].permute(0, 2, 1, 3, 4)
        for i, t in enumerate(steps):
            lat = torch.cat([ctx, x], dim=2)
            tvec = torch.cat([torch.zeros(b, n), torch.full((b, f), t)], dim=1)
            flow = dense_forward(m, lat, tvec, None, f, texts=texts, text_of_frame=text_of_frame,
                                 chunk_of_frame=chunk_of_frame)[:, :, n:]
            x0 = (x.double() - sig(t) * flow.double()).to(x.dtype)
            if i + 1 < len(steps):
                eps = torch.randn((b * f, c, hh, ww), generator=generator, dtype=x.dtype)
                eps = eps.view(b, f, c, hh, ww).permute(0, 2, 1, 3, 4)
                s1 = sig(steps[i + 1])
                x = ((1 - s1) * x0.double() + s1 * eps.double()).to(x0.dtype)
        out[:, :, s0:s0 + f] = x0
    return out
