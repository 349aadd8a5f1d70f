"""An independent dense block-causal reference of Self Forcing inference.

Written from the Wan2.1 / Self Forcing equations, sharing no code with
``headforcing_core``'s runner, cache, plan, RoPE or schedule. Every denoising
call runs the *whole prefix* of the video at once: committed chunks as their
clean latents at timestep 0, the current chunk at its noisy timestep, with a
block-causal mask (a chunk sees itself and earlier chunks). Because attention
is block-causal, the earlier chunks' keys and values in that pass equal the
ones the AR sampler committed in their clean passes, so the current chunk's
output must equal the AR sampler's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinusoid(freq_dim, t):
    half = freq_dim // 2
    t = t.double().flatten()
    inv = torch.pow(torch.tensor(10000.0, dtype=torch.float64), -torch.arange(half, dtype=torch.float64) / half)
    a = t[:, None] * inv[None]
    return torch.cat([a.cos(), a.sin()], 1)


def rope_table(head_dim, max_len=1024):
    """Wan's complex RoPE table: [max_len, head_dim/2] per axis concatenated (t | h | w)."""
    d = head_dim

    def params(dim):
        inv = 1.0 / torch.pow(torch.tensor(10000.0, dtype=torch.float64), torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
        return torch.polar(torch.ones_like(ang), ang)

    return torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1)


def rope_apply(x, f, h, w, table):
    """x: [B, S, N, D] with S = f*h*w tokens at absolute (frame, row, col)."""
    b, s, n, d = x.shape
    c = d // 2
    ft, fh, fw = table.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    freqs = torch.cat([
        ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(s, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(b, s, n, -1, 2))
    return torch.view_as_real(xc * freqs).flatten(3).to(x.dtype)


def rms(x, weight, eps=1e-6):
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


def layer_norm(x, eps=1e-6, weight=None, bias=None):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def text_kv(m, context, dtype):
    """Every layer's cross-attention K and V of a text-encoder output ``[B, L, 4096]``, zero-padded to 512 tokens
    first (Wan pads after the text encoder)."""
    b, heads = context.shape[0], m.num_heads
    lin = lambda mod, inp: F.linear(inp, mod.weight.to(dtype), mod.bias.to(dtype))  # noqa: E731
    ctx = torch.cat([context, context.new_zeros(b, 512 - context.shape[1], context.shape[2])], 1).to(dtype)
    tx = m.text_embedding
    ctx = lin(tx[2], F.gelu(lin(tx[0], ctx), approximate="tanh"))
    out = []
    for blk in m.blocks:
        ca = blk.cross_attn
        hd = ca.q.weight.shape[0] // heads
        out.append((rms(lin(ca.k, ctx), ca.norm_k.weight).view(b, -1, heads, hd), lin(ca.v, ctx).view(b, -1, heads, hd)))
    return out


def dense_forward(m, latents, timesteps, context, chunk_frames, *, texts=None, text_of_frame=None,
                  chunk_of_frame=None):
    """Full-prefix forward at positions ``0 … F−1``. latents [B, C, F, H, W]; timesteps [B, F]; chunk_frames: chunk
    size (a frame attends every frame of its chunk and the chunks before). Optionally frames with prompts of their
    own — ``texts`` (each :func:`text_kv`) and the text of every frame — and chunks given frame by frame."""
    dtype = latents.dtype
    b, c, fr, hh, ww = latents.shape
    dim = m.patch_embedding.weight.shape[0]
    heads = m.num_heads
    hd = dim // heads
    p = m.patch_embedding.weight.shape[2:]
    gh, gw = hh // p[1], ww // p[2]
    tok = gh * gw
    x = F.conv3d(latents, m.patch_embedding.weight.to(dtype), m.patch_embedding.bias.to(dtype), stride=tuple(p))
    x = x.flatten(2).transpose(1, 2)  # [B, S, dim]
    s = x.shape[1]

    lin = lambda mod, inp: F.linear(inp, mod.weight.to(dtype), mod.bias.to(dtype))  # noqa: E731
    te = m.time_embedding
    e = lin(te[2], F.silu(lin(te[0], sinusoid(m.freq_dim, timesteps).to(dtype))))  # [B*F, dim]
    e0 = lin(m.time_projection[1], F.silu(e)).view(b, fr, 6, dim)

    texts = texts if texts is not None else [text_kv(m, context, dtype)]
    text_tok = torch.tensor(text_of_frame if text_of_frame is not None else [0] * fr).repeat_interleave(tok)
    # block-causal mask over frames: chunk i attends chunks ≤ i
    chunks = chunk_of_frame if chunk_of_frame is not None else [i // chunk_frames for i in range(fr)]
    chunk_of_token = torch.tensor(chunks).repeat_interleave(tok)
    mask = chunk_of_token[:, None] >= chunk_of_token[None, :]
    table = rope_table(hd)

    def per_frame(y):
        return y.view(b, fr, tok, dim)

    for layer, blk in enumerate(m.blocks):
        mod = (blk.modulation.to(dtype)[:, None] + e0).chunk(6, dim=2)
        inp = (per_frame(layer_norm(x)) * (1 + mod[1]) + mod[0]).reshape(b, s, dim)
        sa = blk.self_attn
        q = rms(lin(sa.q, inp), sa.norm_q.weight).view(b, s, heads, hd)
        k = rms(lin(sa.k, inp), sa.norm_k.weight).view(b, s, heads, hd)
        v = lin(sa.v, inp).view(b, s, heads, hd)
        q, k = rope_apply(q, fr, gh, gw, table), rope_apply(k, fr, gh, gw, table)
        att = torch.einsum("bsnd,btnd->bnst", q, k) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("bnst,btnd->bsnd", att, v).reshape(b, s, dim)
        x = x + (per_frame(lin(sa.o, y)) * mod[2]).reshape(b, s, dim)

        ca = blk.cross_attn
        xn = layer_norm(x, weight=blk.norm3.weight.to(dtype), bias=blk.norm3.bias.to(dtype))
        cq = rms(lin(ca.q, xn), ca.norm_q.weight).view(b, s, heads, hd)
        co = torch.empty_like(cq)
        for i, kv in enumerate(texts):
            sel = text_tok == i
            if bool(sel.any()):
                ck, cv = kv[layer]
                catt = (torch.einsum("bsnd,btnd->bnst", cq[:, sel], ck) / math.sqrt(hd)).softmax(-1)
                co[:, sel] = torch.einsum("bnst,btnd->bsnd", catt, cv)
        x = x + lin(ca.o, co.reshape(b, s, dim))

        inp = (per_frame(layer_norm(x)) * (1 + mod[4]) + mod[3]).reshape(b, s, dim)
        y = lin(blk.ffn[2], F.gelu(lin(blk.ffn[0], inp), approximate="tanh"))
        x = x + (per_frame(y) * mod[5]).reshape(b, s, dim)

    hm = (m.head.modulation.to(dtype)[:, None] + e.view(b, fr, 1, dim)).chunk(2, dim=2)
    out = lin(m.head.head, per_frame(layer_norm(x)) * (1 + hm[1]) + hm[0])  # [b, fr, tok, 4c]
    cout = out.shape[-1] // (p[1] * p[2])
    out = out.view(b, fr, gh, gw, p[1], p[2], cout).permute(0, 6, 1, 2, 4, 3, 5)
    return out.reshape(b, cout, fr, hh, ww)


def self_forcing_table(shift):
    s = 1.0 - torch.arange(1000, dtype=torch.float64) / 1000
    sigma = shift * s / (1 + (shift - 1) * s)
    return sigma, sigma * 1000


def dense_generate(m, context, noise, steps, shift, chunk_frames, generator, initial=None, first_steps=None):
    """Self Forcing inference, every call a dense block-causal forward of the whole prefix.

    ``initial``: clean latents before the new frames (Self Forcing's / Causal Forcing's
    ``initial_latent``), part of every prefix at timestep 0; ``first_steps``: the first generated
    chunk's nominal steps (Causal Forcing's ``denoising_step_list_first_chunk``)."""
    sigma, tt = self_forcing_table(shift)
    padded = torch.cat([tt, tt.new_zeros(1)])  # Self Forcing's warp table ends with a 0 (nominal step 0)
    warp = lambda steps_: [float(padded[1000 - int(s)]) for s in steps_]  # noqa: E731

    def sig(t):
        return float(sigma[torch.argmin((tt - t).abs())])

    b, c, total, hh, ww = noise.shape
    t0 = 0 if initial is None else initial.shape[2]
    out = torch.zeros_like(noise)
    for n, start in enumerate(range(0, total, chunk_frames)):
        ts = warp(first_steps if (n == 0 and first_steps is not None) else steps)
        f = min(chunk_frames, total - start)
        x = noise[:, :, start:start + f]
        for i, t in enumerate(ts):
            parts = ([initial] if t0 else []) + [out[:, :, :start], x]
            lat = torch.cat(parts, dim=2)
            tvec = torch.cat([torch.zeros(b, t0 + start), torch.full((b, f), t)], dim=1)
            flow = dense_forward(m, lat, tvec, context, chunk_frames)[:, :, t0 + start:]
            x0 = (x.double() - sig(t) * flow.double()).to(x.dtype)
            if i + 1 < len(ts):
                eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.dtype)
                s1 = sig(ts[i + 1])
                x = ((1 - s1) * x0.double() + s1 * eps.double()).to(x0.dtype)
        out[:, :, start:start + f] = x0
    return out
