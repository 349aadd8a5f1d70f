"""Per-head attention statistics, measured from sampled queries during a calibration rollout.

What is measured
----------------
For every self-attention call of the rollout (every layer, every denoising step and the
clean pass of every chunk) the collector takes a seeded random sample of the chunk's query
tokens (the same tokens for every layer, step and head of the chunk), computes their
pre-softmax logits against *all* keys the call attends to, ``[B, heads, n_sampled, L]``
(never a full ``[S, L]`` map), and reduces them at once to per-(query frame, key frame)
sums. For one sampled query ``i`` of query frame ``q`` and one key frame ``k``:

* **mass**      ``m_ik = Σ_{j ∈ k} softmax_j(l_i)`` — the attention mass ``i`` puts on frame ``k``;
* **logit**     ``c̄_ik = mean_{j ∈ k} c_ij`` with ``c_ij = l_ij − mean_{j' ∈ all keys} l_ij'``
  — the pre-softmax logit, centred per query (over every key the query attends to);
* **sign rate** ``s_ik = (#{j ∈ k: c_ij > 0} + ½·#{j ∈ k: c_ij = 0}) / |k|`` — the fraction of
  frame ``k``'s keys whose centred logit is positive (exact ties count one half);
* **uniform**   ``u_ik = |k| / L`` — the mass ``k`` would get if attention were uniform;
* **count**     1 per (query, key frame) pair that exists.

All five are summed over sampled queries and batch rows into fixed-size float64 tensors
``[layers, heads, F, F]`` (F = frames of the calibration window, at most 21), indexed
``[layer, head, query frame, key frame]``. Their size does not depend on the resolution,
the number of prompts or the number of samples: memory is bounded.

Derived per-head quantities (:func:`summarize`) are ratios of these sums, computed over the
queries that have history (chunks after the first):

* mass on **sink** frames (the first ``sink_frames``), **recent** frames (history at most
  ``recent_frames`` before the chunk start), **middle** frames (the rest of the history) and
  the **current** chunk — with the same shares under uniform attention for comparison;
* per **age** sequences: age ``a ≥ 1`` of a history frame for a query is
  ``query frame − key frame``; age 0 collects the whole current chunk. ``mass_by_age[a]``,
  ``sign_rate_by_age[a]`` and ``logit_by_age[a]`` are means over the (query, frame) pairs
  at that age;
* the **dominant period** of ``logit_by_age[1:]`` (history ages), see :func:`dominant_period`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ProfileError

STAT_NAMES = ("mass", "positive", "logit", "uniform", "count")


@dataclass
class FrameStats:
    """Raw accumulators ``[layers, heads, F, F]`` (float64, CPU); see the module docstring."""

    frames: int
    frames_per_block: int
    mass: torch.Tensor
    positive: torch.Tensor
    logit: torch.Tensor
    uniform: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, num_layers: int, num_heads: int, frames: int, frames_per_block: int) -> "FrameStats":
        shape = (num_layers, num_heads, frames, frames)
        return cls(frames, frames_per_block, *(torch.zeros(shape, dtype=torch.float64) for _ in STAT_NAMES))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mass.shape[:2])  # type: ignore[return-value]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STAT_NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], frames_per_block: int) -> "FrameStats":
        missing = [n for n in STAT_NAMES if n not in tensors]
        if missing:
            raise ProfileError(f"profile statistics lack {', '.join(missing)}")
        shape = tuple(tensors["mass"].shape)
        if len(shape) != 4 or shape[2] != shape[3] or shape[2] < 1:
            raise ProfileError(f"profile statistics have shape {shape}; expected [layers, heads, frames, frames]")
        for n in STAT_NAMES:
            t = tensors[n]
            if tuple(t.shape) != shape:
                raise ProfileError(f"profile statistic {n!r} has shape {tuple(t.shape)}, expected {shape}")
            if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
                raise ProfileError(f"profile statistic {n!r} is not a finite floating-point tensor")
        if frames_per_block < 1:
            raise ProfileError(f"frames_per_block must be ≥ 1, got {frames_per_block}")
        return cls(shape[2], frames_per_block, *(tensors[n].to(torch.float64) for n in STAT_NAMES))


class AttentionCollector:
    """The sampler's observer: accumulates :class:`FrameStats` from sampled queries.

    ``current_chunk()`` must return ``(chunk_start, frames)`` of the chunk being run
    (the profiler reads it off the sampler's last plan). Query tokens are drawn once per
    (prompt, chunk) from ``seed``: ``queries_per_frame`` distinct tokens of every frame of
    the chunk (all of them if the frame is smaller).
    """

    def __init__(self, stats: FrameStats, *, tokens_per_frame: int, queries_per_frame: int, seed: int,
                 current_chunk, max_elements: int = 1 << 23):
        self.stats = stats
        self.tokens_per_frame = tokens_per_frame
        self.queries_per_frame = max(1, min(queries_per_frame, tokens_per_frame))
        self.seed = int(seed)
        self.current_chunk = current_chunk
        self.max_elements = max_elements
        self.prompt_index = 0
        self._key: tuple | None = None
        self._idx: torch.Tensor | None = None
        self._qframes: torch.Tensor | None = None
        self.observations = 0  # sampled query tokens × layers × calls (per head group), for the report

    def start_prompt(self, index: int) -> None:
        self.prompt_index = index
        self._key = None

    def _draw(self, chunk_start: int, frames: int) -> None:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.prompt_index * 10_007 + chunk_start)
                                          % (2**63))
        tpf, n = self.tokens_per_frame, self.queries_per_frame
        idx, qf = [], []
        for j in range(frames):
            pick = torch.randperm(tpf, generator=g)[:n].sort().values
            idx.append(pick + j * tpf)
            qf.append(torch.full((n,), chunk_start + j, dtype=torch.long))
        self._idx, self._qframes = torch.cat(idx), torch.cat(qf)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, key_frames: torch.Tensor) -> None:
        """``q``: rotated queries ``[B, S, H, D]``; ``k``: rotated keys ``[B, H, L, D]``; ``key_frames``:
        the frame of each key ``[L]`` (-1: a key slot holding no frame)."""
        chunk_start, frames = self.current_chunk()
        key = (self.prompt_index, chunk_start, frames)
        if key != self._key:
            self._draw(chunk_start, frames)
            self._key = key
        st = self.stats
        F = st.frames
        tpf = self.tokens_per_frame
        b, s, hg, d = q.shape
        if s != frames * tpf:
            raise ProfileError(f"chunk has {s} query tokens, expected {frames}×{tpf}")
        device = q.device
        seg = key_frames.to(device)
        L = int(seg.numel())
        if L != k.shape[2]:
            raise ProfileError(f"the layer has {k.shape[2]} keys but {L} key frames")
        kf_cpu = key_frames.cpu()
        if int(kf_cpu.max()) >= F or int(kf_cpu.min()) < 0:
            raise ProfileError(f"key frame outside the calibration window of {F} frames")
        tokens = torch.bincount(kf_cpu, minlength=F).to(torch.float64)
        tokens_dev = tokens.to(device, torch.float32).clamp_min(1.0)

        idx = self._idx.to(device)
        qf = self._qframes.to(device)
        n = int(idx.numel())
        qs = q[:, idx].float()  # [B, n, Hg, D]
        kf = k.float().transpose(1, 2)  # [B, L, Hg, D]
        scale = d ** -0.5
        step = max(1, self.max_elements // max(1, b * n * L))
        heads = list(range(hg))
        for h0 in range(0, hg, step):
            h1 = min(hg, h0 + step)
            logits = torch.einsum("bnhd,blhd->bhnl", qs[:, :, h0:h1], kf[:, :, h0:h1]) * scale  # [B,h,n,L]
            probs = torch.softmax(logits, dim=-1)
            cent = logits - logits.mean(dim=-1, keepdim=True)
            sign = torch.where(cent > 0, 1.0, torch.where(cent == 0, 0.5, 0.0))
            del logits
            hh = h1 - h0
            out = []
            for x, per_token in ((probs, False), (sign, True), (cent, True)):
                red = torch.zeros(b, hh, n, F, device=device, dtype=torch.float32)
                red.index_add_(3, seg, x)
                if per_token:
                    red = red / tokens_dev
                red = red.sum(0)  # [h, n, F]
                by_q = torch.zeros(hh, F, F, device=device, dtype=torch.float32)
                by_q.index_add_(1, qf, red)
                out.append(by_q.to("cpu", torch.float64))
            del probs, sign, cent
            sel = heads[h0:h1]
            st.mass[layer, sel] += out[0]
            st.positive[layer, sel] += out[1]
            st.logit[layer, sel] += out[2]
        # count / uniform do not depend on the head
        per_q = torch.bincount(self._qframes, minlength=F).to(torch.float64) * b  # [F]
        present = (tokens > 0).to(torch.float64)
        cnt = per_q[:, None] * present[None, :]
        uni = per_q[:, None] * (tokens / L)[None, :]
        st.count[layer, heads] += cnt
        st.uniform[layer, heads] += uni
        self.observations += n * b


# ---------------------------------------------------------------------------------------------
# summaries


@dataclass(frozen=True)
class HeadSummary:
    """Per-head statistics derived from :class:`FrameStats` (numpy, ``[layers, heads(, ages)]``)."""

    sink_frames: int
    recent_frames: int
    sink_mass: np.ndarray
    recent_mass: np.ndarray
    middle_mass: np.ndarray
    current_mass: np.ndarray
    sink_uniform: np.ndarray
    recent_uniform: np.ndarray
    middle_uniform: np.ndarray
    current_uniform: np.ndarray
    mass_by_age: np.ndarray      # [L, H, F]; age 0 = current chunk; NaN where never observed
    sign_rate_by_age: np.ndarray
    logit_by_age: np.ndarray
    period: np.ndarray           # dominant period of logit_by_age[1:] in frames (NaN: none)
    period_strength: np.ndarray  # share of the detrended sequence's variance one sinusoid explains
    period_amplitude: np.ndarray  # that sinusoid's amplitude, in logits

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}


def chunk_starts(frames: int, frames_per_block: int) -> np.ndarray:
    """Start frame of the chunk each frame belongs to (chunks from frame 0)."""
    f = np.arange(frames)
    return (f // frames_per_block) * frames_per_block


def category_masks(frames: int, frames_per_block: int, sink_frames: int, recent_frames: int) -> dict[str, np.ndarray]:
    """Boolean ``[F_query, F_key]`` masks of the four key categories, for queries with history."""
    cs = chunk_starts(frames, frames_per_block)[:, None]
    k = np.arange(frames)[None, :]
    has_hist = cs > 0
    history = (k < cs) & has_hist
    current = (k >= cs) & (k < cs + frames_per_block) & has_hist
    sink = history & (k < sink_frames)
    recent = history & ~sink & (cs - k <= recent_frames)
    middle = history & ~sink & ~recent
    return {"sink": sink, "recent": recent, "middle": middle, "current": current}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def summarize(stats: FrameStats, *, sink_frames: int = 3, recent_frames: int = 4) -> HeadSummary:
    """Turn raw sums into per-head ratios (see the module docstring)."""
    if sink_frames < 0 or recent_frames < 0:
        raise ProfileError("sink_frames and recent_frames must be ≥ 0")
    F, fpb = stats.frames, stats.frames_per_block
    mass, pos, logit = stats.mass.numpy(), stats.positive.numpy(), stats.logit.numpy()
    uni, cnt = stats.uniform.numpy(), stats.count.numpy()
    masks = category_masks(F, fpb, sink_frames, recent_frames)
    cs = chunk_starts(F, fpb)
    q_with_hist = cs > 0
    diag = np.arange(F)
    q_count = (cnt[:, :, diag, diag] * q_with_hist[None, None, :]).sum(-1)  # observations of queries with history
    cat = {}
    for name, m in masks.items():
        cat[name + "_mass"] = _ratio((mass * m).sum((-1, -2)), q_count)
        cat[name + "_uniform"] = _ratio((uni * m).sum((-1, -2)), q_count)

    # per-age sequences
    age = diag[:, None] - diag[None, :]  # query frame − key frame
    hist = masks["sink"] | masks["recent"] | masks["middle"]
    cur = masks["current"]
    L, H = mass.shape[:2]
    by_age = {n: np.full((L, H, F), np.nan) for n in ("mass", "sign", "logit")}
    cur_cnt = (cnt * cur).sum((-1, -2))
    by_age["mass"][:, :, 0] = _ratio((mass * cur).sum((-1, -2)), q_count)
    by_age["sign"][:, :, 0] = _ratio((pos * cur).sum((-1, -2)), cur_cnt)
    by_age["logit"][:, :, 0] = _ratio((logit * cur).sum((-1, -2)), cur_cnt)
    for a in range(1, F):
        m = hist & (age == a)
        if not m.any():
            continue
        c = (cnt * m).sum((-1, -2))
        by_age["mass"][:, :, a] = _ratio((mass * m).sum((-1, -2)), c)
        by_age["sign"][:, :, a] = _ratio((pos * m).sum((-1, -2)), c)
        by_age["logit"][:, :, a] = _ratio((logit * m).sum((-1, -2)), c)

    period = np.full((L, H), np.nan)
    strength = np.zeros((L, H))
    amplitude = np.zeros((L, H))
    for li in range(L):
        for hi in range(H):
            seq = by_age["logit"][li, hi, 1:]
            seq = seq[np.isfinite(seq)]
            period[li, hi], strength[li, hi], amplitude[li, hi] = dominant_period(seq)
    return HeadSummary(sink_frames, recent_frames, **cat, mass_by_age=by_age["mass"],
                       sign_rate_by_age=by_age["sign"], logit_by_age=by_age["logit"], period=period,
                       period_strength=strength, period_amplitude=amplitude)


def dominant_period(seq: np.ndarray, pad: int = 16) -> tuple[float, float, float]:
    """Dominant period of a sequence sampled once per frame: ``(period, strength, amplitude)``.

    The sequence's mean and linear trend are removed (least squares); the peak of the
    zero-padded FFT power spectrum (``pad``× the length, DC excluded, periods between 2
    frames and the sequence length) gives the frequency ``f`` and ``period = 1/f`` in
    frames. ``strength`` is the share of the detrended sequence's variance explained by one
    least-squares sinusoid of that frequency (with mean and trend refitted), in [0, 1];
    ``amplitude`` is that sinusoid's amplitude. A sequence shorter than 4 samples or
    (numerically) flat gives ``(nan, 0, 0)``.
    """
    x = np.asarray(seq, dtype=np.float64)
    n = x.size
    if n < 4:
        return float("nan"), 0.0, 0.0
    t = np.arange(n, dtype=np.float64)
    base = np.stack([np.ones(n), t - t.mean()], axis=1)
    resid = x - base @ np.linalg.lstsq(base, x, rcond=None)[0]
    var = float(resid @ resid)
    if var <= 1e-12 * max(1.0, float(x @ x)) or var < 1e-18:
        return float("nan"), 0.0, 0.0
    m = 1 << int(np.ceil(np.log2(pad * n)))
    power = np.abs(np.fft.rfft(resid, m)) ** 2
    freqs = np.fft.rfftfreq(m)
    valid = (freqs >= 1.0 / n - 1e-12) & (freqs <= 0.5 + 1e-12)
    power = np.where(valid, power, -1.0)
    k = int(np.argmax(power))  # first maximum: the lowest frequency among exact ties
    f = float(freqs[k])
    design = np.concatenate([base, np.cos(2 * np.pi * f * t)[:, None], np.sin(2 * np.pi * f * t)[:, None]], axis=1)
    coef = np.linalg.lstsq(design, resid, rcond=None)[0]
    fit_resid = resid - design @ coef
    strength = float(np.clip(1.0 - float(fit_resid @ fit_resid) / var, 0.0, 1.0))
    amplitude = float(np.hypot(coef[2], coef[3]))
    return 1.0 / f, strength, amplitude
