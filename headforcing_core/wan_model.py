"""A reference Wan2.1 text-to-video backbone with the official parameter names.

This module only *holds* parameters, laid out exactly like the official Wan2.1 /
Self Forcing ``WanModel`` and ComfyUI's ``comfy.ldm.wan.model.WanModel`` (same
attribute names, same state-dict keys). It has no forward pass of its own: the
:class:`~headforcing_core.backbone.WanRunner` drives it, and ComfyUI's module, by
attribute name. Use it to run the core without ComfyUI, to build tiny random
models for tests, and to load a flat Wan state dict (shapes inferred).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

WAN_HEAD_DIM = 128  # every Wan2.1 model uses 128-wide heads; dim // 128 heads
WAN_TEXT_LEN = 512  # umT5 context is zero-padded to this many tokens


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan2.1 T2V backbone. Defaults are Wan2.1-T2V-1.3B."""

    dim: int = 1536
    num_heads: int = 12
    num_layers: int = 30
    ffn_dim: int = 8960
    text_dim: int = 4096
    freq_dim: int = 256
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    text_len: int = WAN_TEXT_LEN

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head dim {head_dim} must be even and at least 6 for 3-D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "WanConfig":
        d = dict(d)
        d["patch_size"] = tuple(d.get("patch_size", (1, 2, 2)))
        return cls(**d)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], num_heads: int | None = None) -> "WanConfig":
        """Infer the shape from a flat Wan state dict (official key names)."""
        required = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                    "head.head.weight", "head.modulation", "blocks.0.ffn.0.weight"]
        missing = [k for k in required if k not in sd]
        if missing:
            raise ValueError(
                "not a Wan2.1 text-to-video state dict: missing "
                + ", ".join(missing[:4])
                + (" …" if len(missing) > 4 else "")
            )
        pe = sd["patch_embedding.weight"]
        dim, in_dim = int(pe.shape[0]), int(pe.shape[1])
        patch = tuple(int(s) for s in pe.shape[2:])
        num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        out_dim = int(sd["head.head.weight"].shape[0]) // math.prod(patch)
        return cls(
            dim=dim,
            num_heads=num_heads or max(1, dim // WAN_HEAD_DIM),
            num_layers=num_layers,
            ffn_dim=int(sd["blocks.0.ffn.0.weight"].shape[0]),
            text_dim=int(sd["text_embedding.0.weight"].shape[1]),
            freq_dim=int(sd["time_embedding.0.weight"].shape[1]),
            in_dim=in_dim,
            out_dim=out_dim,
            patch_size=patch,  # type: ignore[arg-type]
        )


WAN21_1_3B = WanConfig()  # Self Forcing, Causal Forcing, LongLive: 30 layers × 12 heads × 128, dim 1536
WAN21_14B = WanConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824)  # Krea Realtime 14B: 40 × 40 × 128
# the public Wan 2.1 text-to-video layouts, named by (layers, heads): every checkpoint of one is distilled from
# that base model (tests use narrow models of the same layout: 40 layers × 40 heads of width 8)
WAN_LAYOUTS = {"Wan 2.1 1.3B": WAN21_1_3B, "Wan 2.1 14B": WAN21_14B}


def layout_name(num_layers: int, num_heads: int) -> str | None:
    """The public Wan 2.1 layout with these layers × heads (``"Wan 2.1 14B"``), or None."""
    for name, cfg in WAN_LAYOUTS.items():
        if (cfg.num_layers, cfg.num_heads) == (int(num_layers), int(num_heads)):
            return name
    return None


class WanRMSNorm(nn.Module):
    """RMS norm over the whole model width, computed in float32 (as Wan does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Wan: norm(x.float()).type_as(x) * weight. F.rms_norm is that norm: ATen's definition widens
        # half-precision input to float32 and rounds the result once (one fused kernel on CUDA), so
        # the float32 copy and the cast back are not passes of their own
        return F.rms_norm(x, x.shape[-1:], eps=self.eps) * self.weight.to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (float64 for float64 input) and stored in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # half-precision input goes in as it is (as ComfyUI's Wan module has it): layer_norm computes
        # its statistics and the affine map in float32 and rounds once on store — Wan's
        # norm(x.float()).type_as(x) up to float32 summation order (1 ulp in ≈ 0.003 % of bf16
        # elements on the CPU) — without the float32 copy and the cast back. float32 weights stay
        # float32 (layer_norm takes them beside half-precision input).
        work = x if x.dtype in (torch.float64, torch.float16, torch.bfloat16) else x.float()
        half = work.dtype in (torch.float16, torch.bfloat16)
        keep = (work.dtype, torch.float32) if half else (work.dtype,)
        w = self.weight if self.weight is None or self.weight.dtype in keep else self.weight.to(work.dtype)
        b = self.bias if self.bias is None or self.bias.dtype in keep else self.bias.to(work.dtype)
        return F.layer_norm(work, self.normalized_shape, w, b, self.eps).type_as(x)


class WanAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = WanLayerNorm(cfg.dim, cfg.eps)
        self.self_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm2 = WanLayerNorm(cfg.dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)


class WanBackbone(nn.Module):
    """Parameter container with Wan2.1's names; driven by ``WanRunner``."""

    def __init__(self, config: WanConfig | None = None):
        super().__init__()
        cfg = config or WanConfig()
        self.config = cfg
        # attributes the runner (and ComfyUI's WanModel) expose under these names
        self.dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.num_layers = cfg.num_layers
        self.freq_dim = cfg.freq_dim
        self.text_len = cfg.text_len
        self.patch_size = cfg.patch_size
        self.in_dim = cfg.in_dim
        self.out_dim = cfg.out_dim
        self.eps = cfg.eps

        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = WanHead(cfg)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], num_heads: int | None = None,
                        strict: bool = True) -> "WanBackbone":
        """Build a backbone whose shape is inferred from ``sd`` and load it."""
        cfg = WanConfig.from_state_dict(sd, num_heads=num_heads)
        model = cls(cfg)
        dtype = next(iter(sd.values())).dtype
        model.to(dtype)
        result = model.load_state_dict(dict(sd), strict=strict)
        if not strict and result.missing_keys:
            raise ValueError(f"state dict lacks {len(result.missing_keys)} Wan keys, e.g. {result.missing_keys[:3]}")
        return model


def random_backbone(config: WanConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> WanBackbone:
    """A randomly initialised backbone whose activations stay finite and non-trivial.

    PyTorch's default init already keeps each Linear near unit gain; the only
    deviation from it is a smaller output head so random flows stay O(1).
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = WanBackbone(config)
        with torch.no_grad():
            model.head.head.weight.mul_(0.5)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype)
