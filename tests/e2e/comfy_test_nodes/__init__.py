"""Test-only ComfyUI nodes (ids prefixed ``HFTest``), loaded by the end-to-end tests and the tiny demo.

Never shipped to users: the pack's own ``__init__.py`` does not import this folder; the
harness links it into the server's ``custom_nodes/`` next to the pack.

* ``HFTestConditioning``: random CONDITIONING ``[1, L, dim=4096]`` (normal * 0.1) from a seed;
  stands in for umT5 + CLIPTextEncode, which cannot be made tiny.
* ``HFTestRandomLatent``: a random Wan-shaped LATENT ``[B, 16, T, H/8, W/8]``.
* ``HFTestModelInfo`` / ``HFTestVAEInfo``: output nodes that report, as UI text (JSON), how
  ComfyUI detected a loaded MODEL / VAE (classes, shapes, dtypes, latent format).
* ``HFTestContextVAE``: the pack's streaming VAE for Krea's context re-encode (``nodes/krea.py``
  ``ComfyContextVAE``) against ComfyUI's own ``VAE.decode`` / ``VAE.encode``; reports the differences.
* ``HFTestTextEncoder``: a CLIP stand-in (``tokenize`` / ``encode_from_tokens_scheduled``, what
  ComfyUI's CLIPTextEncode and the pack call) whose output ``[1, words, 4096]`` is a deterministic
  function of the text; stands in for umT5 where a CLIP is wired (live prompts, Schedule From Text).
"""
from __future__ import annotations

import hashlib
import json

import torch
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io, ui

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))


class HFTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HFTestConditioning",
            display_name="HF Test: Random Conditioning",
            category="testing/headforcing",
            description="Random umT5-shaped CONDITIONING [1, length, 4096] (normal * 0.1). Test-only.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED),
                io.Int.Input("length", default=512, min=1, max=4096),
                io.Float.Input("scale", default=0.1, min=0.0, max=10.0, step=0.01, optional=True),
                io.Int.Input("dim", default=4096, min=1, max=16384, optional=True,
                             tooltip="channels per token (umT5-XXL: 4096); other values test refusals"),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed, length, scale=0.1, dim=4096) -> io.NodeOutput:
        cond = torch.randn((1, length, dim), generator=_generator(seed)) * scale
        return io.NodeOutput([[cond, {}]])


class HFTestRandomLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HFTestRandomLatent",
            display_name="HF Test: Random Video Latent",
            category="testing/headforcing",
            description="Random normal LATENT [batch, 16, (length-1)//4+1, height/8, width/8]. Test-only.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED),
                io.Int.Input("width", default=64, min=16, max=8192, step=16),
                io.Int.Input("height", default=64, min=16, max=8192, step=16),
                io.Int.Input("length", default=9, min=1, max=100000, step=4),
                io.Int.Input("batch_size", default=1, min=1, max=64),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, seed, width, height, length, batch_size=1) -> io.NodeOutput:
        shape = (batch_size, 16, (length - 1) // 4 + 1, height // 8, width // 8)
        return io.NodeOutput({"samples": torch.randn(shape, generator=_generator(seed))})


def _describe_model(model) -> dict:
    base = model.model
    dm = base.diffusion_model
    info = {
        "patcher": type(model).__name__,
        "base_model": type(base).__name__,
        "model_config": type(base.model_config).__name__,
        "unet_config": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in base.model_config.unet_config.items()
                        if isinstance(v, (int, float, str, bool, tuple, list, type(None)))},
        "diffusion_model": f"{type(dm).__module__}.{type(dm).__name__}",
        "latent_format": type(base.latent_format).__name__,
        "model_type": str(getattr(base, "model_type", None)),
        "model_sampling": type(base.model_sampling).__name__,
        "shift": float(getattr(base.model_sampling, "shift", float("nan"))),
        "model_dtype": str(model.model_dtype()),
        "load_device": str(model.load_device),
        "num_blocks": len(getattr(dm, "blocks", [])),
        "dim": getattr(dm, "dim", None),
        "num_heads": getattr(dm, "num_heads", None),
        "params": sum(p.numel() for p in dm.parameters()),
        # the loaded size: ModelPatcher.model_size() (what the pack's pre-flight counts) and the
        # diffusion model's own state dict (model_size also holds the model_sampling tables)
        "model_size": int(model.model_size()),
        "diffusion_model_bytes": sum(t.nelement() * t.element_size() for t in dm.state_dict().values()),
        "param_dtypes": sorted({str(t.dtype) for t in dm.state_dict().values()}),
        "manual_cast_dtype": str(getattr(base, "manual_cast_dtype", None)),
        "scaled_fp8": str(getattr(base.model_config, "scaled_fp8", None)),
    }
    return info


class HFTestModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HFTestModelInfo",
            display_name="HF Test: Model Info",
            category="testing/headforcing",
            description="Reports (UI text, JSON) how ComfyUI detected a MODEL. Test-only.",
            inputs=[io.Model.Input("model")],
            outputs=[io.String.Output()],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        text = json.dumps(_describe_model(model), sort_keys=True)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class HFTestVAEInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HFTestVAEInfo",
            display_name="HF Test: VAE Info",
            category="testing/headforcing",
            description="Reports (UI text, JSON) how ComfyUI detected a VAE. Test-only.",
            inputs=[io.Vae.Input("vae")],
            outputs=[io.String.Output()],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vae) -> io.NodeOutput:
        fsm = vae.first_stage_model
        info = {
            "first_stage_model": f"{type(fsm).__module__}.{type(fsm).__name__}",
            "latent_channels": vae.latent_channels,
            "latent_dim": vae.latent_dim,
            "dim": getattr(fsm, "dim", None),
            "z_dim": getattr(fsm, "z_dim", None),
            "vae_dtype": str(vae.vae_dtype),
            "upscale_ratio_t_of_3": vae.upscale_ratio[0](3) if callable(vae.upscale_ratio[0]) else None,
            "spatial_upscale": list(vae.upscale_ratio[1:]),
        }
        text = json.dumps(info, sort_keys=True)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class HFTestContextVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HFTestContextVAE",
            display_name="HF Test: Krea context VAE",
            category="testing/headforcing",
            description="Streams a LATENT through the pack's context VAE block by block and compares it with "
                        "ComfyUI's VAE.decode of the whole latent, and its one-frame encode with VAE.encode. "
                        "Reports (UI text, JSON) the largest differences. Test-only.",
            inputs=[io.Model.Input("model"), io.Vae.Input("vae"), io.Latent.Input("latent"),
                    io.Int.Input("block", default=3, min=1, max=64)],
            outputs=[io.String.Output()],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, vae, latent, block=3) -> io.NodeOutput:
        import sys

        import comfy.model_management as mm

        # the pack's module as ComfyUI loaded it (named after the pack's folder path)
        pack = next(m for name, m in list(sys.modules.items())
                    if name.endswith(".nodes.krea") and hasattr(m, "ComfyContextVAE"))
        mm.load_models_gpu([model, vae.patcher], force_full_load=True)
        raw = latent["samples"].float()
        stream = pack.ComfyContextVAE(vae, model)
        x = model.model.process_latent_in(raw)
        frames = torch.cat([stream.decode(x[:, :, s:s + block]) for s in range(0, x.shape[2], block)], dim=1)
        whole = vae.decode(raw)  # [B, F, H, W, 3] in [0, 1]
        ours = frames.movedim(2, -1).to(whole.device)
        frame = whole[:, -1]  # one decoded frame [B, H, W, 3]
        enc_ours = stream.encode(frame.movedim(-1, 1))
        enc_comfy = model.model.process_latent_in(vae.encode(frame).float())
        info = {"frames": int(ours.shape[1]), "comfy_frames": int(whole.shape[1]),
                "decode_max_abs": float((ours - whole).abs().max()), "decode_scale": float(whole.abs().max()),
                "encode_shape": list(enc_ours.shape),
                "encode_max_abs": float((enc_ours - enc_comfy.to(enc_ours)).abs().max()),
                "encode_scale": float(enc_comfy.abs().max())}
        text = json.dumps(info, sort_keys=True)
        return io.NodeOutput(text, ui=ui.PreviewText(text))
class TestTextEncoder:
    """Text → ``[1, words, dim]``: word ``i`` becomes a normal vector (* ``scale``) seeded by a hash of ``i`` and
    the word, so the same text always gives the same tensor and different texts differ. ComfyUI's CLIP
    interface as far as CLIPTextEncode and the pack use it."""

    MAX_TOKENS = 512

    def __init__(self, dim: int = 4096, scale: float = 0.1):
        self.dim, self.scale = int(dim), float(scale)
        self.encoded = 0  # texts encoded (the tests count them)

    def tokenize(self, text, **kwargs):
        return {"words": (str(text).split() or [""])[: self.MAX_TOKENS]}

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        self.encoded += 1
        rows = []
        for i, word in enumerate(tokens["words"]):
            seed = int.from_bytes(hashlib.sha256(f"{i}:{word}".encode()).digest()[:8], "little") % (2**63)
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)) * self.scale)
        return [[torch.stack(rows)[None], {"pooled_output": None}]]


class HFTestTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HFTestTextEncoder",
            display_name="HF Test: Text Encoder",
            category="testing/headforcing",
            description="A CLIP stand-in: text -> [1, words, 4096], deterministic from the text. Test-only.",
            inputs=[io.Float.Input("scale", default=0.1, min=0.0, max=10.0, step=0.01, optional=True)],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, scale=0.1) -> io.NodeOutput:
        return io.NodeOutput(TestTextEncoder(scale=scale))


class HFTestExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [HFTestConditioning, HFTestRandomLatent, HFTestModelInfo, HFTestVAEInfo, HFTestContextVAE,
                HFTestTextEncoder]


async def comfy_entrypoint() -> HFTestExtension:
    return HFTestExtension()
