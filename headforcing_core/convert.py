"""Convert Self Forcing / Causal Forcing / LongLive checkpoints (and LongLive's LoRA) for ComfyUI.

Self Forcing, Causal Forcing and LongLive save ``{"generator": state_dict,
"generator_ema": state_dict, ...}`` with keys under ``model.``
(``model._fsdp_wrapped_module.`` when saved from FSDP). ComfyUI's "Load Diffusion
Model" (UNETLoader) wants the bare Wan keys in a safetensors file.

LongLive (NVlabs/LongLive, v1.0) ships its model as ``longlive_base.pt`` plus a PEFT
LoRA, ``lora.pt``. Its ``utils/lora_utils.py`` (``configure_lora_for_model``) wraps every
``nn.Linear`` inside each attention block — ``blocks.{i}.self_attn.{q,k,v,o}``,
``blocks.{i}.cross_attn.{q,k,v,o}``, ``blocks.{i}.ffn.0``, ``blocks.{i}.ffn.2`` — with
``peft.LoraConfig(r=rank, lora_alpha=alpha or rank)`` (rank 256, alpha 256 in
``configs/longlive_*inference.yaml``), and ``trainer/distillation.py`` saves
``{"generator_lora": get_peft_model_state_dict(...), "critic_lora": ..., "step": ...}``;
its inference scripts accept that dict or a bare PEFT state dict. The keys look like
``base_model.model.blocks.0.self_attn.q.lora_A.weight`` (A: ``[r, in]``) and
``….lora_B.weight`` (B: ``[out, r]``); alpha is not stored in the file. The effective
weight is ``W + (alpha / r) · B @ A``.

Usage::

    # a checkpoint -> flat safetensors for models/diffusion_models
    python -m headforcing_core.convert self_forcing_dmd.pt self_forcing_dmd.safetensors --ema
    # LongLive: the base with its LoRA merged in
    python -m headforcing_core.convert longlive_base.pt longlive.safetensors --lora lora.pt
    # LongLive: the LoRA alone, in ComfyUI's key format (models/loras, LoraLoaderModelOnly)
    python -m headforcing_core.convert --lora-only lora.pt longlive_lora.safetensors --base longlive_base.pt

The ComfyUI LoRA file has, per adapted Linear ``m``, ``diffusion_model.{m}.lora_A.weight``
``[r, in]``, ``diffusion_model.{m}.lora_B.weight`` ``[out, r]`` and ``diffusion_model.{m}.alpha``
(a scalar): the generic keys ``comfy.lora.model_lora_keys_unet`` maps for a Wan model, the
``lora_B``/``lora_A`` pair ``comfy.weight_adapter.lora.LoRAAdapter`` reads, and the alpha
``comfy.lora.load_lora`` reads (ComfyUI 0.3.75), so ``LoraLoaderModelOnly`` at strength
``s`` gives ``W + s · (alpha / r) · B @ A``.

Every ``.pt`` file is read with ``torch.load(weights_only=True)``: a file that needs
arbitrary pickled objects is refused, never executed.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import CheckpointError
from .wan_model import WAN_HEAD_DIM, WanBackbone, WanConfig

PREFIXES = ("model._fsdp_wrapped_module.", "_fsdp_wrapped_module.", "model.", "module.")
DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMFY_LORA_PREFIX = "diffusion_model."  # comfy.lora.model_lora_keys_unet: "diffusion_model.<module>"

# PEFT keys, after wrapper names are dropped: <module>.lora_A[.<adapter>].weight, <module>.lora_B[...]
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
_ALPHA_KEY = re.compile(r"(?P<module>.+)\.alpha")
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_LORA_PREFIXES = ("base_model.model.", "diffusion_model.", *PREFIXES)


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with a little-endian u64 header length and a JSON header."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8


def load_checkpoint(path: str) -> Mapping:
    """Read a ``.pt`` file safely (tensors, dicts, lists and numbers only)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    name = os.path.basename(path)
    with open(path, "rb") as fh:
        magic = fh.read(2)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and magic[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint (unknown file format)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        detail = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "GLOBAL" in ln]
        if detail:
            raise CheckpointError(
                f"{name} needs objects other than tensors to load and was refused for safety "
                f"(torch.load with weights_only=True): {detail[0]}"
            ) from None
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint (corrupt pickle)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint: {first}") from None


def load_weights(path: str) -> Mapping:
    """A ``.pt`` checkpoint (via :func:`load_checkpoint`) or a ``.safetensors`` file."""
    if os.path.isfile(path) and _is_safetensors(path):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{os.path.basename(path)} is not a readable safetensors file: {e}") from None
    return load_checkpoint(path)


def _looks_like_lora(keys) -> bool:
    return any(".lora_A." in k or ".lora_B." in k or k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


def extract_generator(ckpt: Mapping, ema: bool = False) -> dict[str, torch.Tensor]:
    """The generator's weights with Wan key names (prefixes stripped)."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"expected a dict checkpoint, got {type(ckpt).__name__}")
    key = "generator_ema" if ema else "generator"
    if key in ckpt:
        sd = ckpt[key]
    elif ema:
        raise CheckpointError("the checkpoint has no 'generator_ema' weights; convert without --ema")
    elif "model" in ckpt and isinstance(ckpt["model"], Mapping):
        sd = ckpt["model"]
    elif "generator_lora" in ckpt:
        raise CheckpointError("this is a LoRA file ('generator_lora'), not a model checkpoint: give the base "
                              "checkpoint as input and this file with --lora (or convert it with --lora-only)")
    else:
        sd = ckpt  # already a bare state dict
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"'{key}' is not a state dict")
    if _looks_like_lora(sd):
        raise CheckpointError("these weights are PEFT LoRA weights (lora_A / lora_B keys), not a model: give the "
                              "base checkpoint as input and the LoRA with --lora (or convert it with --lora-only)")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = k
        for p in PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                break
        out[name] = v
    try:
        WanConfig.from_state_dict(out)
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's generator is not a Wan2.1 T2V model: {e}") from None
    return out


# =============================================================================================
# LoRA
# =============================================================================================

@dataclass(frozen=True)
class LoraPair:
    """One adapted Linear: ``W' = W + (alpha / rank) · up @ down``."""

    module: str          # Wan module path, e.g. "blocks.0.self_attn.q" (its weight: "<module>.weight")
    down: torch.Tensor   # PEFT lora_A, [rank, in]
    up: torch.Tensor     # PEFT lora_B, [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, int]:
        return int(self.up.shape[0]), int(self.down.shape[1])


def lora_module_name(key: str) -> str:
    """Wan module path of a LoRA key's module part, whatever wraps it.

    ``base_model.model.blocks.0.self_attn.q`` → ``blocks.0.self_attn.q``;
    ``model._fsdp_wrapped_module.blocks.3.ffn.0`` → ``blocks.3.ffn.0``;
    ``diffusion_model.head.head`` → ``head.head``.
    """
    name = key
    for w in _WRAPPERS:
        name = name.replace(w, "")
    if not name.startswith("blocks."):
        i = name.find(".blocks.")
        if i >= 0:
            return name[i + 1:]  # any prefix before "blocks." (PEFT, FSDP, the model wrapper)
    stripped = True
    while stripped:
        stripped = False
        for p in _LORA_PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p):], True
    return name


def _unwrap_lora(ckpt: Mapping, name: str) -> Mapping:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name}: expected a dict of LoRA weights, got {type(ckpt).__name__}")
    if "generator_lora" in ckpt:  # LongLive's trainer: {"generator_lora", "critic_lora", "step"}
        sd = ckpt["generator_lora"]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{name}: 'generator_lora' is not a state dict")
        return sd
    if "critic_lora" in ckpt:
        raise CheckpointError(f"{name} has a 'critic_lora' but no 'generator_lora': the critic's LoRA is for "
                              "training only and cannot be used for sampling")
    if "generator" in ckpt or "generator_ema" in ckpt:
        raise CheckpointError(f"{name} is a model checkpoint ('generator'), not a LoRA: give it as the input "
                              "(base) and the LoRA file with --lora")
    return ckpt  # a bare PEFT state dict


def parse_lora(ckpt: Mapping, alpha: float | None = None, name: str = "the LoRA") -> dict[str, LoraPair]:
    """PEFT (or ComfyUI-format) LoRA weights → ``{module: LoraPair}`` with Wan module names.

    ``alpha`` (None: an ``.alpha`` tensor in the file if there is one, else the rank — scale
    1, as LongLive's ``lora_alpha = alpha or rank``) sets ``scale = alpha / rank``; an explicit
    value wins over tensors in the file.
    """
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise CheckpointError(f"LoRA alpha must be a positive number, got {alpha}")
    sd = _unwrap_lora(ckpt, name)
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    adapters: set[str] = set()
    bad: list[str] = []
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. "step"
        m = _LORA_KEY.fullmatch(key)
        if m:
            if m["adapter"] is not None:
                adapters.add(m["adapter"])
            module = lora_module_name(m["module"])
            target = downs if m["kind"] == "A" else ups
            if module in target:
                raise CheckpointError(f"{name} holds two lora_{m['kind']} weights for {module} "
                                      f"(the second is {key!r})")
            if value.ndim != 2 or not value.is_floating_point():
                raise CheckpointError(f"{name}: {key} is a {value.dtype} tensor of shape {list(value.shape)}; "
                                      "a Linear LoRA weight is a 2-D float matrix")
            target[module] = value
            continue
        m = _ALPHA_KEY.fullmatch(key)
        if m and value.numel() == 1:
            alphas[lora_module_name(m["module"])] = float(value.reshape(()).item())
            continue
        bad.append(key)
    if bad:
        raise CheckpointError(
            f"{name} has {len(bad)} key(s) that are not PEFT LoRA weights, e.g. {bad[:3]}; expected "
            "'<module>.lora_A.weight' / '<module>.lora_B.weight' (DoRA, LoHa and bias adapters are not supported)")
    if len(adapters) > 1:
        raise CheckpointError(f"{name} holds several PEFT adapters ({', '.join(sorted(adapters))}); save one")
    if not downs and not ups:
        raise CheckpointError(f"{name} holds no LoRA weights (expected PEFT keys such as "
                              "'base_model.model.blocks.0.self_attn.q.lora_A.weight')")
    stray = sorted(set(alphas) - set(downs) - set(ups))
    if stray:
        raise CheckpointError(f"{name} has an alpha but no lora_A / lora_B weights for {stray[:3]}")
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        detail = ", ".join(f"{m} has only lora_{'A' if m in downs else 'B'}" for m in unpaired[:3])
        raise CheckpointError(f"{name} is incomplete: {len(unpaired)} module(s) lack half of their A/B pair "
                              f"({detail}{' …' if len(unpaired) > 3 else ''})")
    pairs: dict[str, LoraPair] = {}
    for module in sorted(downs, key=_module_order):
        down, up = downs[module], ups[module]
        if down.shape[0] != up.shape[1]:
            raise CheckpointError(f"{name}: {module} has lora_A {list(down.shape)} and lora_B {list(up.shape)}; "
                                  "A is [rank, in] and B is [out, rank], so their ranks must agree")
        a = alpha if alpha is not None else alphas.get(module, float(down.shape[0]))
        if not (math.isfinite(a) and a > 0):
            raise CheckpointError(f"{name}: {module} has alpha {a}; it must be a positive number")
        pairs[module] = LoraPair(module, down, up, float(a))
    return pairs


def _module_order(module: str):
    m = re.match(r"blocks\.(\d+)\.(.*)", module)
    return (1, int(m[1]), m[2]) if m else (0, 0, module)


def describe_lora(pairs: Mapping[str, LoraPair]) -> str:
    ranks = sorted({p.rank for p in pairs.values()})
    alphas = sorted({p.alpha for p in pairs.values()})
    scales = sorted({p.scale for p in pairs.values()})
    fmt = lambda xs: "/".join(f"{x:g}" for x in xs)  # noqa: E731
    return f"{len(pairs)} LoRA modules, rank {fmt(ranks)}, alpha {fmt(alphas)} (scale {fmt(scales)})"


def check_lora_fits(pairs: Mapping[str, LoraPair], shapes: Mapping[str, tuple], base: str = "the base model") -> None:
    """Every LoRA module must be a 2-D weight of ``shapes`` (``{key: shape}``) with the LoRA's in/out sizes."""
    layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")), default=-1)
    missing, wrong = [], []
    for module, pair in pairs.items():
        shape = shapes.get(module + ".weight")
        if shape is None or len(shape) != 2:
            missing.append(module)
        elif tuple(int(s) for s in shape) != pair.weight_shape:
            wrong.append((module, pair.weight_shape, tuple(int(s) for s in shape)))
    if missing:
        raise CheckpointError(
            f"the LoRA adapts {len(missing)} module(s) that {base} does not have as a Linear weight, e.g. "
            f"{missing[:3]} ({base} has {layers} blocks): this LoRA is for another model")
    if wrong:
        module, lora_shape, base_shape = wrong[0]
        raise CheckpointError(
            f"the LoRA does not fit {base}: {module} is {base_shape[0]}x{base_shape[1]} (out x in) there but the "
            f"LoRA's B @ A is {lora_shape[0]}x{lora_shape[1]} ({len(wrong)} module(s) differ): this LoRA is for "
            "another model shape")


def wan_shapes(config: WanConfig) -> dict[str, tuple]:
    """Every key and shape of a Wan backbone of ``config`` (nothing allocated)."""
    with torch.device("meta"):
        model = WanBackbone(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def lora_model_shape(pairs: Mapping[str, LoraPair]) -> WanConfig:
    """The Wan shape a LoRA was made for, read off its own matrices (for checks without a base)."""
    dim = ffn = None
    for module, pair in pairs.items():
        out_f, in_f = pair.weight_shape
        if re.fullmatch(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]", module):
            dim = dim or in_f
        elif re.fullmatch(r"blocks\.\d+\.ffn\.0", module):
            dim, ffn = dim or in_f, ffn or out_f
        elif re.fullmatch(r"blocks\.\d+\.ffn\.2", module):
            dim, ffn = dim or out_f, ffn or in_f
    if dim is None:
        raise CheckpointError("cannot tell the model shape from this LoRA alone (it adapts no attention or "
                              "feed-forward layer of a Wan block); pass the base checkpoint with --base")
    layers = 1 + max((int(m.split(".")[1]) for m in pairs if m.startswith("blocks.")), default=0)
    heads = max(1, dim // WAN_HEAD_DIM)
    try:
        return WanConfig(dim=dim, num_heads=heads if dim % heads == 0 else 1, num_layers=layers,
                         ffn_dim=ffn or 4 * dim)
    except ValueError as e:
        raise CheckpointError(f"this LoRA is not for a Wan2.1 model (width {dim}): {e}") from None


def merge_lora(sd: Mapping[str, torch.Tensor], pairs: Mapping[str, LoraPair],
               strength: float = 1.0) -> dict[str, torch.Tensor]:
    """``sd`` with ``W + strength · (alpha / r) · B @ A`` for every LoRA module (computed in
    float32 or wider, stored in the weight's dtype). ``sd`` itself is left unchanged."""
    check_lora_fits(pairs, {k: tuple(v.shape) for k, v in sd.items()})
    out = dict(sd)
    for module, pair in pairs.items():
        key = module + ".weight"
        w = sd[key]
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = pair.up.to(acc) @ pair.down.to(acc)
        out[key] = (w.to(acc) + (strength * pair.scale) * delta).to(w.dtype)
    return out


def comfy_lora_state_dict(pairs: Mapping[str, LoraPair], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA in ComfyUI's key format: ``diffusion_model.<module>.{lora_A.weight, lora_B.weight, alpha}``."""
    out: dict[str, torch.Tensor] = {}
    for module, pair in pairs.items():
        key = COMFY_LORA_PREFIX + module
        out[key + ".lora_A.weight"] = pair.down.to(dtype) if dtype is not None else pair.down
        out[key + ".lora_B.weight"] = pair.up.to(dtype) if dtype is not None else pair.up
        out[key + ".alpha"] = torch.tensor(float(pair.alpha), dtype=torch.float32)
    return out


def base_shapes(path: str, ema: bool = False) -> dict[str, tuple]:
    """Key → shape of a base model file: a flat ``.safetensors`` (read lazily) or a ``.pt`` checkpoint."""
    if os.path.isfile(path) and _is_safetensors(path):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{os.path.basename(path)} is not a readable safetensors file: {e}") from None
        shapes = {k[len(COMFY_LORA_PREFIX):] if k.startswith(COMFY_LORA_PREFIX) else k: s for k, s in shapes.items()}
        if "patch_embedding.weight" not in shapes:
            raise CheckpointError(f"{os.path.basename(path)} is not a Wan2.1 diffusion model (no patch_embedding)")
        return shapes
    return {k: tuple(v.shape) for k, v in extract_generator(load_checkpoint(path), ema=ema).items()}


# =============================================================================================
# files
# =============================================================================================

def save_flat(sd: Mapping[str, torch.Tensor], out_path: str, dtype: torch.dtype | None = None,
              metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> None:
    from safetensors.torch import save_file

    if os.path.exists(out_path) and not overwrite:
        raise CheckpointError(f"{out_path} exists; pass --force to replace it")
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in sd.items()}
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, out_path)  # never leave a half-written file under the real name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _check_output(out_path: str, overwrite: bool, inputs: tuple[str | None, ...]) -> None:
    """Refuse before any work: an existing output (without --force), or an output that is an input."""
    for p in inputs:
        if p and os.path.exists(p) and os.path.exists(out_path) and os.path.samefile(p, out_path):
            raise CheckpointError(f"the output {out_path} is one of the input files; choose another name")
    if os.path.exists(out_path) and not overwrite:
        raise CheckpointError(f"{out_path} exists; pass --force to replace it")


def convert(in_path: str, out_path: str, ema: bool = False, dtype: str = "keep", overwrite: bool = False, *,
            lora: str | None = None, lora_alpha: float | None = None) -> WanConfig:
    """Checkpoint → flat safetensors; with ``lora``, its LoRA merged in (``W + (alpha/r) · B @ A``).

    ``in_path`` is a ``.pt`` checkpoint, or an already flat ``.safetensors`` model (to merge a LoRA
    into a converted base)."""
    _check_dtype(dtype)
    _check_output(out_path, overwrite, (in_path, lora))
    sd = extract_generator(load_weights(in_path), ema=ema)
    cfg = WanConfig.from_state_dict(sd)
    meta = {"converted_from": os.path.basename(in_path), "weights": "generator_ema" if ema else "generator",
            "converter": "headforcing_core.convert"}
    if lora is not None:
        pairs = parse_lora(load_weights(lora), lora_alpha, name=os.path.basename(lora))
        sd = merge_lora(sd, pairs)
        meta.update(lora_merged=os.path.basename(lora), lora=describe_lora(pairs))
    save_flat(sd, out_path, DTYPES[dtype], meta, overwrite)
    return cfg


def convert_lora(lora_path: str, out_path: str, lora_alpha: float | None = None, base: str | None = None,
                 dtype: str = "keep", overwrite: bool = False) -> dict[str, LoraPair]:
    """PEFT LoRA → a LoRA file in ComfyUI's key format, checked against ``base`` (a ``.pt`` checkpoint or
    a flat ``.safetensors``) when given, else against the Wan shape its own matrices imply."""
    _check_dtype(dtype)
    _check_output(out_path, overwrite, (lora_path, base))
    pairs = parse_lora(load_weights(lora_path), lora_alpha, name=os.path.basename(lora_path))
    if base is not None:
        check_lora_fits(pairs, base_shapes(base), f"the base model {os.path.basename(base)}")
    else:
        check_lora_fits(pairs, wan_shapes(lora_model_shape(pairs)), "a Wan2.1 model")
    meta = {"converted_from": os.path.basename(lora_path), "converter": "headforcing_core.convert",
            "format": "ComfyUI LoRA (diffusion_model.<module>.lora_A/lora_B/alpha)", "lora": describe_lora(pairs)}
    save_flat(comfy_lora_state_dict(pairs, DTYPES[dtype]), out_path, None, meta, overwrite)
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m headforcing_core.convert",
        description="Convert a Self Forcing / Causal Forcing / LongLive .pt checkpoint to the flat safetensors "
                    "file ComfyUI's 'Load Diffusion Model' reads, optionally merging a PEFT LoRA into it "
                    "(--lora); or, with --lora-only, convert a PEFT LoRA into a LoRA file for ComfyUI's "
                    "'LoraLoaderModelOnly' (models/loras).",
        epilog="examples:\n"
               "  %(prog)s self_forcing_dmd.pt self_forcing_dmd.safetensors --ema\n"
               "  %(prog)s longlive_base.pt longlive.safetensors --lora lora.pt\n"
               "  %(prog)s --lora-only lora.pt longlive_lora.safetensors --base longlive_base.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="the .pt checkpoint (or a flat .safetensors model to merge --lora into); with "
                                  "--lora-only: the PEFT LoRA (.pt or .safetensors)")
    ap.add_argument("output", help="the .safetensors file to write (models/diffusion_models, or models/loras "
                                   "with --lora-only)")
    ap.add_argument("--ema", action="store_true", help="convert the EMA weights (generator_ema)")
    ap.add_argument("--lora", metavar="LORA", help="merge this PEFT LoRA (LongLive's lora.pt) into the weights")
    ap.add_argument("--lora-only", action="store_true",
                    help="the input is a PEFT LoRA: write it in ComfyUI's LoRA key format instead")
    ap.add_argument("--lora-alpha", type=float, metavar="ALPHA",
                    help="the LoRA's alpha (scale = alpha / rank); default: an alpha stored in the file, else "
                         "the rank (scale 1; LongLive: rank 256, alpha 256)")
    ap.add_argument("--base", metavar="BASE",
                    help="with --lora-only: check the LoRA against this base model (.pt or .safetensors)")
    ap.add_argument("--dtype", default="keep", choices=sorted(DTYPES), help="cast floating weights")
    ap.add_argument("--force", action="store_true", help="replace an existing output file")
    args = ap.parse_args(argv)
    if args.lora_only and (args.lora or args.ema):
        ap.error("--lora-only converts a LoRA on its own; it does not take --lora or --ema")
    if args.base and not args.lora_only:
        ap.error("--base only goes with --lora-only")
    if args.lora_alpha is not None and not (args.lora or args.lora_only):
        ap.error("--lora-alpha needs --lora or --lora-only")
    try:
        if args.lora_only:
            pairs = convert_lora(args.input, args.output, args.lora_alpha, args.base, args.dtype, args.force)
            print(f"wrote {args.output}: ComfyUI LoRA, {describe_lora(pairs)}")
        else:
            cfg = convert(args.input, args.output, args.ema, args.dtype, args.force, lora=args.lora,
                          lora_alpha=args.lora_alpha)
            merged = f", LoRA {os.path.basename(args.lora)} merged" if args.lora else ""
            print(f"wrote {args.output}: Wan2.1 T2V, dim {cfg.dim}, {cfg.num_layers} layers, "
                  f"{cfg.num_heads} heads{merged}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
