"""A dense per-head reference of the AR sampler under any cache policy (no code shared with the cache).

It re-runs Self Forcing's chunk-wise loop with its own Wan forward pass, its own store of every
committed frame's raw K/V, its own pooling, merging and RoPE, and plain softmax attention. The
only thing it takes from the pack is each chunk's *listing*: which frames, merged blocks,
episodes and chunk frames every head type attends per query frame and pass, and at which RoPE
time (episodes: which frames each holds — the reference averages them itself and places them
with its own restatement of the ``compact`` rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dense_reference import layer_norm, rms, self_forcing_table, sinusoid


def _angles(head_dim, t, h, w):
    """Wan's RoPE angles for float positions (float64): ``[N, head_dim/2]``."""
    c = head_dim // 2
    splits = (c - 2 * (c // 3), c // 3, c // 3)
    out = []
    for pos, pairs in zip((t, h, w), splits):
        dim = 2 * pairs
        inv = 1.0 / torch.pow(torch.tensor(10000.0, dtype=torch.float64),
                              torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        out.append(pos.double()[:, None] * inv[None])
    return torch.cat(out, dim=1)


def rope(x, t, h, w):
    """Rotate ``x`` ``[N, D]`` (one head's tokens) at positions (t, h, w) ``[N]`` each."""
    a = _angles(x.shape[-1], t, h, w)
    xc = torch.view_as_complex(x.double().reshape(x.shape[0], -1, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(a), a)).reshape(x.shape)


def grid_positions(gh, gw, pool=1, placement="native"):
    hh, ww = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    if pool == 1:
        return hh.flatten(), ww.flatten()
    if placement == "top_left":
        return hh[::pool, ::pool].flatten(), ww[::pool, ::pool].flatten()
    hp = F.avg_pool2d(hh[None, None], pool, ceil_mode=True).flatten()
    wp = F.avg_pool2d(ww[None, None], pool, ceil_mode=True).flatten()
    return hp, wp


def pool_frame(x, gh, gw, pool):
    """``[tokens, D]`` → mean of ``pool×pool`` windows (border windows: the tokens they hold)."""
    if pool == 1:
        return x
    g = x.T.reshape(1, -1, gh, gw).double()
    return F.avg_pool2d(g, pool, ceil_mode=True).reshape(x.shape[1], -1).T


def compact_times(own, chunk_start, frames, window=21):
    """Head-wise compact RoPE, restated: history ranked by time right before the chunk."""
    order = sorted(range(len(own)), key=lambda i: (own[i], i))
    n, room = len(own), window - frames
    out = [0.0] * n
    for r, i in enumerate(order):
        out[i] = chunk_start + (r - n if n <= room else (room - 1) * r / max(n - 1, 1) - room)
    return out


class Reference:
    """Self Forcing's loop with per-head key sets from recorded listings."""

    def __init__(self, model, head_types, latent_hw, frames_per_block, rope_mode):
        self.m = model
        self.head_types = head_types
        self.fpb = frames_per_block
        self.rope_mode = rope_mode
        p = model.patch_embedding.weight.shape[2:]
        self.gh, self.gw = latent_hw[0] // p[1], latent_hw[1] // p[2]
        self.tok = self.gh * self.gw
        self.dim = model.patch_embedding.weight.shape[0]
        self.heads = model.num_heads
        self.hd = self.dim // self.heads
        self.store = {}  # (layer, frame) -> (k raw [B, tok, H, D], v)

    # ---- key sets ----------------------------------------------------------------------------
    def _keys(self, listing, layer, heads, b, chunk_start, kq, vq):
        """K (rotated) and V ``[heads, L, D]`` one query frame of these heads (one type) attends."""
        ks, vs = [], []
        gh, gw = self.gh, self.gw
        hs = list(heads)
        entries = listing["entries"]
        episodes = listing["episodes"].get((b, layer)) if listing["episodes"] else None
        if episodes is not None and self.rope_mode == "compact":  # times of every history entry depend on them
            hist = [e for e in entries if e[0] == "frame"]
            own = [float(e[1]) for e in hist] + [(fr[0] + fr[-1]) / 2 for fr in episodes]
            times = compact_times(own, chunk_start, listing["frames"])
            entries = [(e[0], e[1], times[hist.index(e)] if e[0] == "frame" else e[2], *e[3:]) for e in entries]
            episode_times = times[len(hist):]
        else:
            episode_times = [(fr[0] + fr[-1]) / 2 for fr in episodes] if episodes else []

        def pooled(frames, which, pool):  # mean over frames of pool×pool-averaged raw K or V: [heads, tokens', D]
            return torch.stack([torch.stack([pool_frame(self.store[(layer, f)][which][b, :, h], gh, gw, pool)
                                             for h in hs]) for f in frames]).mean(0)

        def add(k, v, time, pool, placement):
            hp, wp = grid_positions(gh, gw, pool, placement)
            ks.append(torch.stack([rope(k[i], torch.full_like(hp, float(time)), hp, wp) for i in range(len(hs))]))
            vs.append(v.double())

        for source, index, time, pool, placement in entries:
            if source == "frame":
                add(self.store[(layer, index)][0][b, :, hs].transpose(0, 1),
                    self.store[(layer, index)][1][b, :, hs].transpose(0, 1), time, 1, "native")
            elif source == "chunk":
                sl = slice(index * self.tok, (index + 1) * self.tok)
                add(kq[b, sl][:, hs].transpose(0, 1), vq[b, sl][:, hs].transpose(0, 1), time, 1, "native")
            elif source == "block":
                frames = range(index * pool * pool, (index + 1) * pool * pool)
                add(pooled(frames, 0, pool), pooled(frames, 1, pool), time, pool, placement)
            elif source == "episodes":
                for frames, t_e in zip(episodes, episode_times):
                    add(pooled(frames, 0, pool), pooled(frames, 1, pool), t_e, pool, "centroid")
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    # ---- one forward of a chunk ----------------------------------------------------------------
    def forward(self, latents, t, context, chunk_start, listings, commit):
        m, dtype = self.m, latents.dtype
        b, c, fr, hh, ww = latents.shape
        tok, dim, heads, hd = self.tok, self.dim, self.heads, self.hd
        p = m.patch_embedding.weight.shape[2:]
        x = F.conv3d(latents, m.patch_embedding.weight.to(dtype), m.patch_embedding.bias.to(dtype), stride=tuple(p))
        x = x.flatten(2).transpose(1, 2)
        s = x.shape[1]
        lin = lambda mod, inp: F.linear(inp, mod.weight.to(dtype), mod.bias.to(dtype))  # noqa: E731
        te = m.time_embedding
        e = lin(te[2], F.silu(lin(te[0], sinusoid(m.freq_dim, t).to(dtype))))
        e0 = lin(m.time_projection[1], F.silu(e)).view(b, fr, 6, dim)
        ctx = torch.cat([context, context.new_zeros(context.shape[0], 512 - context.shape[1], context.shape[2])], 1)
        ctx = lin(m.text_embedding[2], F.gelu(lin(m.text_embedding[0], ctx.to(dtype)), approximate="tanh"))
        per_frame = lambda y: y.view(b, fr, tok, dim)  # noqa: E731
        hq, wq = grid_positions(self.gh, self.gw)
        for li, blk in enumerate(m.blocks):
            mod = (blk.modulation.to(dtype)[:, None] + e0).chunk(6, dim=2)
            inp = (per_frame(layer_norm(x)) * (1 + mod[1]) + mod[0]).reshape(b, s, dim)
            sa = blk.self_attn
            q = rms(lin(sa.q, inp), sa.norm_q.weight).view(b, s, heads, hd)
            k = rms(lin(sa.k, inp), sa.norm_k.weight).view(b, s, heads, hd)
            v = lin(sa.v, inp).view(b, s, heads, hd)
            y = torch.zeros(b, s, heads, hd, dtype=torch.float64)
            groups: dict[str, list[int]] = {}
            for h, head_type in enumerate(self.head_types[li]):
                groups.setdefault(head_type, []).append(h)
            for bi in range(b):
                for head_type, hs in groups.items():
                    for j in range(fr):
                        kk, vv = self._keys(listings(head_type, j), li, hs, bi, chunk_start, k, v)
                        qj = q[bi, j * tok:(j + 1) * tok][:, hs]
                        qr = torch.stack([rope(qj[:, i], torch.full_like(hq, float(chunk_start + j)), hq, wq)
                                          for i in range(len(hs))])
                        w_ = torch.softmax(qr @ kk.transpose(1, 2) / math.sqrt(hd), dim=-1)
                        y[bi, j * tok:(j + 1) * tok, hs] = (w_ @ vv).transpose(0, 1)
            if commit:
                for j in range(fr):
                    self.store[(li, chunk_start + j)] = (k[:, j * tok:(j + 1) * tok].double(),
                                                         v[:, j * tok:(j + 1) * tok].double())
            x = x + (per_frame(lin(sa.o, y.to(dtype).reshape(b, s, dim))) * mod[2]).reshape(b, s, dim)
            ca = blk.cross_attn
            xn = layer_norm(x, weight=blk.norm3.weight.to(dtype), bias=blk.norm3.bias.to(dtype))
            cq = rms(lin(ca.q, xn), ca.norm_q.weight).view(b, s, heads, hd)
            ck = rms(lin(ca.k, ctx), ca.norm_k.weight).view(ctx.shape[0], -1, heads, hd)
            cv = lin(ca.v, ctx).view(ctx.shape[0], -1, heads, hd)
            catt = (torch.einsum("bsnd,btnd->bnst", cq, ck) / math.sqrt(hd)).softmax(-1)
            x = x + lin(ca.o, torch.einsum("bnst,btnd->bsnd", catt, cv).reshape(b, s, dim))
            inp = (per_frame(layer_norm(x)) * (1 + mod[4]) + mod[3]).reshape(b, s, dim)
            x = x + (per_frame(lin(blk.ffn[2], F.gelu(lin(blk.ffn[0], inp), approximate="tanh"))) * mod[5]).reshape(b, s, dim)
        hm = (m.head.modulation.to(dtype)[:, None] + e.view(b, fr, 1, dim)).chunk(2, dim=2)
        out = lin(m.head.head, per_frame(layer_norm(x)) * (1 + hm[1]) + hm[0])
        cout = out.shape[-1] // (p[1] * p[2])
        out = out.view(b, fr, self.gh, self.gw, p[1], p[2], cout).permute(0, 6, 1, 2, 4, 3, 5)
        return out.reshape(b, cout, fr, hh, ww)

    def generate(self, context, noise, steps, shift, generator, chunk_listings, before_chunk=None, initial=None,
                 first_steps=None):
        """``chunk_listings[chunk_start](head_type, query_frame, pass_)`` → listing dicts; ``context``: a
        conditioning, or a function of the chunk start; ``before_chunk(start, out)`` runs first (a recache).

        ``initial`` (``[B, C, T0, H, W]``): frames put into the store first, a chunk at a time, by one
        clean pass at timestep 0 each (Self Forcing's ``inference(initial_latent=…)``); the generated
        frames follow at positions ``T0 …`` and only they are returned. ``first_steps``: the step list
        of the first generated chunk (Causal Forcing++'s ``denoising_step_list_first_chunk``)."""
        sigma, tt = self_forcing_table(shift)
        warp = lambda step_list: [float(tt[1000 - st]) for st in step_list]  # noqa: E731
        sig = lambda t: float(sigma[torch.argmin((tt - t).abs())])  # noqa: E731
        b, _, total, _, _ = noise.shape
        out = torch.zeros_like(noise)
        ctx_at = context if callable(context) else (lambda _start: context)
        t0 = 0 if initial is None else initial.shape[2]
        for start in range(0, t0, self.fpb):
            f = min(self.fpb, t0 - start)
            get = chunk_listings[start]
            self.forward(initial[:, :, start:start + f].to(noise.dtype), torch.zeros(b, f), ctx_at(start), start,
                         lambda ht, j, get=get: get(ht, j, "clean"), True)
        for new in range(0, total, self.fpb):
            start = t0 + new
            f = min(self.fpb, total - new)
            if before_chunk is not None:
                before_chunk(start, out)
            context = ctx_at(start)
            get = chunk_listings[start]
            x = noise[:, :, new:new + f]
            ts = warp(first_steps if (first_steps and new == 0) else steps)
            for i, t in enumerate(ts):
                flow = self.forward(x, torch.full((b, f), t), context, start, lambda ht, j: get(ht, j, "noisy"), False)
                x0 = (x.double() - sig(t) * flow.double()).to(x.dtype)
                if i + 1 < len(ts):
                    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.dtype)
                    s1 = sig(ts[i + 1])
                    x = ((1 - s1) * x0.double() + s1 * eps.double()).to(x0.dtype)
            self.forward(x0, torch.zeros(b, f), context, start, lambda ht, j: get(ht, j, "clean"), True)
            out[:, :, new:new + f] = x0
        return out
