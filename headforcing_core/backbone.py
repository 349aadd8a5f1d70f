"""Drive any Wan2.1-shaped diffusion transformer by attribute name.

ComfyUI's ``WanModel``, the official Wan2.1 / Self Forcing modules and our own
:class:`~headforcing_core.wan_model.WanBackbone` share attribute names
(``patch_embedding``, ``text_embedding``, ``blocks[i].self_attn.q`` …), so one
runner serves all of them. It calls the module's own layers (ComfyUI's ops cast
their weights on the fly), never copies weights, and leaves self-attention to a
caller-supplied function: that is where the head-wise KV cache lives.

Semantics follow Self Forcing's ``CausalWanModel`` inference path: per-frame
timestep modulation, text context zero-padded to 512 tokens before
``text_embedding``, un-masked cross-attention, keys handed out *before* RoPE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import HeadForcingError, Interrupted, ModelFamilyError, ShapeError
from .wan_model import WAN_TEXT_LEN, layout_name  # umT5 contexts are padded to WAN_TEXT_LEN (when a module does not say)


class SelfAttentionFn(Protocol):
    """Computes one layer's self-attention for the current chunk.

    ``q``, ``k``, ``v``: ``[B, S, heads, head_dim]`` for the chunk's S tokens,
    after ``norm_q``/``norm_k`` and *before* RoPE. Returns ``[B, S, heads, head_dim]``.
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


_REQUIRED = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head")
_BLOCK_REQUIRED = ("norm1", "self_attn", "norm3", "cross_attn", "norm2", "ffn", "modulation")


@dataclass(frozen=True)
class BackboneSpec:
    """Shapes read off a Wan-shaped module (never hard-coded)."""

    dim: int
    num_heads: int
    num_layers: int
    patch_size: tuple[int, int, int]
    in_dim: int
    out_dim: int
    text_dim: int
    freq_dim: int
    text_len: int
    ffn_dim: int = 0  # 0: unknown (estimates then assume Wan's ratio)
    # the dtype the blocks' Linear weights are stored in (None: unknown, taken as the compute dtype); not part
    # of the shape: the same model loaded in fp8 or bf16 has one spec
    weights_dtype: torch.dtype | None = field(default=None, compare=False)

    @classmethod
    def from_config(cls, cfg) -> "BackboneSpec":
        """The spec of a :class:`~headforcing_core.wan_model.WanConfig` (no module needed)."""
        return cls(cfg.dim, cfg.num_heads, cfg.num_layers, tuple(cfg.patch_size), cfg.in_dim, cfg.out_dim,
                   cfg.text_dim, cfg.freq_dim, cfg.text_len, cfg.ffn_dim)

    @classmethod
    def from_fingerprint(cls, fingerprint: dict) -> "BackboneSpec":
        """The spec of a model known only by its :meth:`fingerprint` (a head profile's or an AR state's
        ``model``): what a fingerprint does not store — time-embedding width, text length, FFN width —
        is Wan 2.1's."""
        from .wan_model import WanConfig  # Wan's defaults; the module itself stays shape-agnostic

        wan, m = WanConfig(), fingerprint
        dim = int(m["dim"])
        ffn = int(m.get("ffn_dim") or (wan.ffn_dim if dim == wan.dim else 0))  # 0: estimated from dim
        return cls(dim, int(m["num_heads"]), int(m["num_layers"]), tuple(int(p) for p in m["patch_size"]),
                   int(m["in_dim"]), int(m["out_dim"]), int(m["text_dim"]), wan.freq_dim, wan.text_len, ffn)

    @property
    def ffn_width(self) -> int:
        return self.ffn_dim or int(self.dim * 5.84)  # Wan: 8960 for 1536

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def layout(self) -> str | None:
        """The public Wan 2.1 layout this shape has (``"Wan 2.1 1.3B"``, ``"Wan 2.1 14B"``; by layers × heads),
        None for any other (a test model, a future size)."""
        return layout_name(self.num_layers, self.num_heads)

    def describe_layout(self) -> str:
        """``"40 layers × 40 heads × 128 (Wan 2.1 14B)"``."""
        name = self.layout
        return f"{self.num_layers} layers × {self.num_heads} heads × {self.head_dim}" + (f" ({name})" if name else "")

    def check_context(self, context: torch.Tensor, batch: int | None = None, what: str = "conditioning") -> None:
        """A text-encoder output must be ``[1 or batch, tokens ≤ text_len, text_dim]`` (the one check of
        a conditioning's shape; :exc:`ShapeError` saying what to change)."""
        if context.ndim != 3 or context.shape[-1] != self.text_dim:
            raise ShapeError(
                f"{what} of shape {tuple(context.shape)} does not fit the model's text width {self.text_dim} "
                f"([batch, tokens, {self.text_dim}]): encode the prompt with the umT5-XXL text encoder "
                "(CLIPLoader type 'wan')")
        if batch is not None and context.shape[0] not in (1, batch):
            raise ShapeError(f"{what} batch {context.shape[0]} does not match the latent batch {batch}")
        if context.shape[1] > self.text_len:
            raise ShapeError(f"{what} has {context.shape[1]} text tokens; the model takes at most {self.text_len}")

    def token_grid(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        """(h, w) patch grid of one latent frame."""
        _, ph, pw = self.patch_size
        if latent_height % ph or latent_width % pw:
            raise ShapeError(
                f"latent size {latent_height}×{latent_width} is not divisible by the patch size {ph}×{pw}; "
                f"use a width and height (in pixels) that are multiples of {8 * max(ph, pw)}"
            )
        return latent_height // ph, latent_width // pw

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        h, w = self.token_grid(latent_height, latent_width)
        return h * w

    def forward_flops(self, query_tokens: int, attended_tokens: float) -> dict[str, float]:
        """FLOPs of one forward over ``query_tokens`` tokens that attend ``attended_tokens`` keys on average."""
        d, s = self.dim, query_tokens
        linear = self.num_layers * (6 * 2 * s * d * d + 2 * 2 * s * d * self.ffn_width)  # qkvo + cross q,o + FFN
        self_attn = self.num_layers * 4 * s * attended_tokens * d
        cross_attn = self.num_layers * 4 * s * self.text_len * d
        return {"linear": float(linear), "self_attention": float(self_attn), "cross_attention": float(cross_attn),
                "total": float(linear + self_attn + cross_attn)}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of a Wan 2.1 text-to-video transformer of this shape (q/k RMS norms, an affine
        cross-attention norm, biased Linear layers: the official module, ComfyUI's ``WanModel``, ours),
        grouped by how ComfyUI stores them when it loads the model (:meth:`weights_bytes`):

        ``linear``          weights and biases of every Linear layer: the text and time embeddings, the time
                            projection, q/k/v/o of both attentions, the feed-forward, the output head;
        ``linear_layers``   how many Linear layers there are (a scaled-fp8 file has a scale for each);
        ``other``           the blocks' and the head's modulation tables and the norm gains;
        ``patch_embedding`` the Conv3d patch embedding's weight and bias.
        """
        d, f, n_layers = self.dim, self.ffn_width, self.num_layers
        patch = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        per_block = 8 * (d * d + d) + (d * f + f) + (f * d + d)  # self q,k,v,o + cross q,k,v,o + FFN
        linear = ((self.text_dim * d + d) + (d * d + d)           # text_embedding: Linear, GELU, Linear
                  + (self.freq_dim * d + d) + (d * d + d)         # time_embedding: Linear, SiLU, Linear
                  + (d * 6 * d + 6 * d)                           # time_projection
                  + n_layers * per_block
                  + (d * self.out_dim * patch + self.out_dim * patch))  # head.head
        other = n_layers * (6 * d + 4 * d + 2 * d) + 2 * d  # modulation, 4 q/k RMS norms, norm3 (weight, bias); head
        return {"linear": linear, "linear_layers": 5 + 10 * n_layers + 1, "other": other,
                "patch_embedding": d * self.in_dim * patch + d}

    def weight_cast_bytes(self, dtype: torch.dtype) -> dict[str, int]:
        """Bytes of the one weight a Linear layer casts at a time, by where in a model call it is cast:
        weights stored in another dtype than the compute ``dtype`` (fp8, a scaled-fp8 file, bf16 weights
        computed in float32) are cast layer by layer on the fly (comfy/ops.py ``cast_bias_weight``: the
        weight and bias in the input's dtype, freed once the layer has run). ``embedding``: the time
        projection (``dim × 6·dim``, the largest Linear of the model, cast before the blocks run),
        ``attention``: q/k/v/o (``dim × dim``), ``ffn``: the feed-forward's wider Linear. All 0 when the
        weights are in the compute dtype (or their dtype is unknown). ``text``: the text embedding's first
        Linear (``text_dim × dim``), cast when a prompt is encoded."""
        if self.weights_dtype is None or self.weights_dtype == dtype:
            return {"embedding": 0, "attention": 0, "ffn": 0, "text": 0}
        d, f, size = self.dim, self.ffn_width, dtype.itemsize
        return {"embedding": (d * 6 * d + 6 * d) * size, "attention": (d * d + d) * size,
                "ffn": (d * f + max(d, f)) * size, "text": (self.text_dim * d + d) * size}

    def weights_bytes(self, dtype: torch.dtype, *, scaled_fp8: torch.dtype | None = None,
                      scales_per_layer: int = 1) -> int:
        """Bytes of this model's weights as ComfyUI holds them once loaded — what ``ModelPatcher.model_size()``
        reports for the diffusion model (ComfyUI adds its 1000-entry float32 sigma table, 4000 bytes).

        ``dtype``: the weight dtype ComfyUI loads in — UNETLoader's ``weight_dtype`` (``fp8_e4m3fn``,
        ``fp8_e4m3fn_fast``: ``torch.float8_e4m3fn``; ``fp8_e5m2``: ``torch.float8_e5m2``), else the
        file's or the device's (bf16 / fp16 on a GPU, float32 on the CPU). Every parameter is stored in
        it but the patch embedding, which ComfyUI's ``WanModel`` keeps in float32 (comfy/ldm/wan/model.py).

        ``scaled_fp8``: a scaled-fp8 file (a ``scaled_fp8`` marker tensor of this dtype; ComfyUI's
        ``comfy/ops.py`` ``scaled_fp8_ops``): only the Linear layers' weights and biases are in it, each layer
        with ``scales_per_layer`` float32 scalars (``scale_weight``; also ``scale_input`` when the
        marker asks for fp8 matrix multiplication: 2), the rest in ``dtype``.
        """
        n = self.parameter_counts()
        fp32 = torch.float32.itemsize
        if scaled_fp8 is None:
            return (n["linear"] + n["other"]) * dtype.itemsize + n["patch_embedding"] * fp32
        return (n["linear"] * scaled_fp8.itemsize + n["linear_layers"] * scales_per_layer * fp32
                + n["other"] * dtype.itemsize + n["patch_embedding"] * fp32)

    def fingerprint(self) -> dict:
        return {"dim": self.dim, "num_heads": self.num_heads, "num_layers": self.num_layers,
                "patch_size": list(self.patch_size), "in_dim": self.in_dim, "out_dim": self.out_dim,
                "text_dim": self.text_dim}


def _first_linear(seq) -> torch.nn.Module:
    for m in seq:
        if hasattr(m, "in_features"):
            return m
    raise ModelFamilyError("expected a Linear layer inside a Wan embedding")


def inspect_backbone(module: torch.nn.Module) -> BackboneSpec:
    """Validate that ``module`` is a Wan2.1 T2V transformer and read its shapes."""
    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if missing:
        raise ModelFamilyError(
            f"this model is not a Wan2.1-family video transformer ({type(module).__name__} lacks "
            f"{', '.join(missing)}). Load a Self Forcing / Causal Forcing (Wan2.1 T2V) checkpoint "
            "with 'Load Diffusion Model'."
        )
    blocks = module.blocks
    if len(blocks) == 0:
        raise ModelFamilyError("the Wan model has no transformer blocks")
    bmissing = [n for n in _BLOCK_REQUIRED if not hasattr(blocks[0], n)]
    if bmissing:
        raise ModelFamilyError(f"Wan block lacks {', '.join(bmissing)}; not a supported Wan2.1 variant")
    if getattr(module, "img_emb", None) is not None or getattr(module, "vace_patch_embedding", None) is not None:
        raise ModelFamilyError(
            "this is an image-to-video / VACE Wan model; Head Forcing samples text-to-video models "
            "(Self Forcing, Causal Forcing)"
        )
    pe = module.patch_embedding
    kernel = tuple(int(k) for k in pe.kernel_size)
    if len(kernel) != 3 or kernel[0] != 1:
        raise ModelFamilyError(f"unsupported Wan patch size {kernel}: the AR sampler needs a temporal patch of 1")
    dim = int(pe.out_channels)
    in_dim = int(pe.in_channels)
    num_heads = int(getattr(module, "num_heads", 0) or getattr(blocks[0].self_attn, "num_heads", 0) or dim // 128)
    if dim % num_heads:
        raise ModelFamilyError(f"model width {dim} is not divisible by {num_heads} heads")
    head_lin = module.head.head
    out_dim = int(head_lin.out_features) // math.prod(kernel)
    if out_dim != in_dim:
        raise ModelFamilyError(
            f"model takes {in_dim} latent channels but predicts {out_dim}: not a text-to-video Wan model"
        )
    text_lin = _first_linear(module.text_embedding)
    time_lin = _first_linear(module.time_embedding)
    ffn_lin = _first_linear(blocks[0].ffn)
    return BackboneSpec(
        dim=dim, num_heads=num_heads, num_layers=len(blocks), patch_size=kernel,  # type: ignore[arg-type]
        in_dim=in_dim, out_dim=out_dim, text_dim=int(text_lin.in_features),
        freq_dim=int(time_lin.in_features), text_len=int(getattr(module, "text_len", WAN_TEXT_LEN) or WAN_TEXT_LEN),
        ffn_dim=int(ffn_lin.out_features), weights_dtype=ffn_lin.weight.dtype,
    )


def sinusoidal_embedding(freq_dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: ``[cos | sin]`` of ``t·10000^(-i/half)``, float64."""
    half = freq_dim // 2
    pos = timesteps.to(torch.float64).flatten()
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angles = torch.outer(pos, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


@dataclass
class TextContext:
    """Cross-attention keys/values of one prompt, per layer: ``[B, heads, 512, head_dim]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]


class WanRunner:
    """Runs a Wan-shaped module chunk by chunk with an external self-attention."""

    def __init__(self, module: torch.nn.Module, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self.module = module
        self.spec = inspect_backbone(module)
        ref = module.blocks[0].self_attn.q.weight
        if dtype is not None and not (dtype.is_floating_point and dtype.itemsize >= 2):
            raise HeadForcingError(f"the compute dtype must be a floating type of 16 bits or more (bfloat16, float16, "
                                   f"float32), got {dtype}; fp8 is a weight format, not a compute dtype")
        self.dtype = dtype or (ref.dtype if ref.dtype.is_floating_point and ref.dtype.itemsize >= 2 else torch.float32)
        self.device = torch.device(device) if device is not None else ref.device
        if ref.dtype.is_floating_point and ref.dtype.itemsize < 2:
            _check_casting_layer(module.blocks[0].self_attn.q, ref.dtype, self.dtype, ref.device)

    # ---- text -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, context: torch.Tensor) -> TextContext:
        """Embed a ``[B, L, text_dim]`` text-encoder output and precompute cross-attn K/V."""
        spec = self.spec
        spec.check_context(context)
        ctx = context.to(self.device, self.dtype)
        # Wan pads *after* the text encoder: zero rows still pass through text_embedding.
        ctx = F.pad(ctx, (0, 0, 0, spec.text_len - ctx.shape[1]))
        emb = self.module.text_embedding(ctx)
        keys, values = [], []
        for block in self.module.blocks:
            ca = block.cross_attn
            k = ca.norm_k(ca.k(emb))
            v = ca.v(emb)
            keys.append(rearrange(k, "b l (n d) -> b n l d", n=spec.num_heads))
            values.append(rearrange(v, "b l (n d) -> b n l d", n=spec.num_heads))
        return TextContext(keys, values)

    # ---- one chunk ----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: TextContext,
                self_attention: SelfAttentionFn, should_stop=None) -> torch.Tensor:
        """Predict the flow of a chunk.

        ``latents``: ``[B, C, f, H, W]``; ``timesteps``: ``[B, f]`` floats (one per frame).
        Returns the flow prediction in the same layout as ``latents``. ``should_stop()`` (optional)
        is asked before every transformer block after the first; True raises
        :class:`~headforcing_core.errors.Interrupted`, so a stop lands within one block's time.
        """
        spec, m = self.spec, self.module
        b, c, f, hh, ww = latents.shape
        if c != spec.in_dim:
            raise ShapeError(f"latents have {c} channels; the model expects {spec.in_dim}")
        grid_h, grid_w = spec.token_grid(hh, ww)
        tokens = grid_h * grid_w
        dtype = self.dtype

        pe_weight = getattr(m.patch_embedding, "weight", None)  # ComfyUI keeps it float32 whatever the model's dtype
        pe_dtype = pe_weight.dtype if pe_weight is not None and pe_weight.dtype.is_floating_point \
            and pe_weight.dtype.itemsize >= 2 else dtype
        x = m.patch_embedding(latents.to(self.device, pe_dtype)).to(dtype)
        x = rearrange(x, "b d f h w -> b (f h w) d")

        t = timesteps.to(self.device).reshape(b, f)
        e = m.time_embedding(sinusoidal_embedding(spec.freq_dim, t).to(dtype))  # [b*f, dim]
        e0 = m.time_projection(e).reshape(b, f, 6, spec.dim)

        ctx_k, ctx_v = text.keys, text.values
        expand = text.batch != b
        for layer, block in enumerate(m.blocks):
            if should_stop is not None and layer and should_stop():
                raise Interrupted(f"interrupted inside a model call, before transformer block {layer + 1} of "
                                  f"{len(m.blocks)}")
            mod = (block.modulation.to(self.device, dtype).unsqueeze(1) + e0).chunk(6, dim=2)  # each [b,f,1,dim]

            # self-attention on the per-frame modulated input
            h = _per_frame(block.norm1(x), f) * (1 + mod[1]) + mod[0]
            h = h.flatten(1, 2)
            sa = block.self_attn
            q = rearrange(sa.norm_q(sa.q(h)), "b s (n d) -> b s n d", n=spec.num_heads)
            k = rearrange(sa.norm_k(sa.k(h)), "b s (n d) -> b s n d", n=spec.num_heads)
            v = rearrange(sa.v(h), "b s (n d) -> b s n d", n=spec.num_heads)
            y = self_attention(layer, q, k, v)
            y = sa.o(y.flatten(2))
            x = x + (_per_frame(y, f) * mod[2]).flatten(1, 2)
            del h, q, k, v, y  # dropped now, not when the names are bound again: they add to the FFN's peak

            # cross-attention to the prompt (no modulation, no mask)
            ca = block.cross_attn
            cq = rearrange(ca.norm_q(ca.q(block.norm3(x))), "b s (n d) -> b n s d", n=spec.num_heads)
            ck, cv = ctx_k[layer], ctx_v[layer]
            if expand:
                ck, cv = ck.expand(b, -1, -1, -1), cv.expand(b, -1, -1, -1)
            co = F.scaled_dot_product_attention(cq, ck, cv)
            x = x + ca.o(rearrange(co, "b n s d -> b s (n d)"))
            del cq, co

            # feed-forward
            h = _per_frame(block.norm2(x), f) * (1 + mod[4]) + mod[3]
            y = block.ffn(h.flatten(1, 2))
            x = x + (_per_frame(y, f) * mod[5]).flatten(1, 2)

        head = m.head
        hmod = (head.modulation.to(self.device, dtype).unsqueeze(1) + e.reshape(b, f, 1, spec.dim)).chunk(2, dim=2)
        out = head.head(_per_frame(head.norm(x), f) * (1 + hmod[1]) + hmod[0])  # [b, f, tokens, p*c]
        pt, ph, pw = spec.patch_size
        out = out.reshape(b, f, grid_h, grid_w, pt, ph, pw, spec.out_dim)
        out = rearrange(out, "b f h w pt ph pw c -> b c (f pt) (h ph) (w pw)")
        assert out.shape[-2:] == (hh, ww) and tokens == grid_h * grid_w
        return out


def _check_casting_layer(layer: torch.nn.Module, weight_dtype: torch.dtype, dtype: torch.dtype, device) -> None:
    """8-bit weights (fp8) are a storage format: the layers must cast them to the compute dtype on the
    fly, as ComfyUI's ops do (comfy/ops.py ``manual_cast``, ``scaled_fp8_ops``); a plain torch Linear
    cannot multiply them. One row through the first layer tells, before any work."""
    try:
        with torch.no_grad():
            layer(torch.zeros(1, layer.in_features, dtype=dtype, device=device))
    except RuntimeError as e:
        raise ModelFamilyError(
            f"the model's weights are {str(weight_dtype).replace('torch.', '')} but its layers do not cast them to the "
            f"compute dtype {str(dtype).replace('torch.', '')} ({e}); load the model with ComfyUI's Load Diffusion "
            "Model (weight_dtype fp8_e4m3fn / fp8_e5m2, or a scaled-fp8 file), or convert the weights to bfloat16 or "
            "float32 first (module.to(torch.bfloat16))") from None


def _per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, f·tokens, D]`` → ``[B, f, tokens, D]`` so per-frame modulation broadcasts."""
    return x.unflatten(1, (frames, -1))
