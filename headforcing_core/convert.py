"""Convert a Self Forcing / Causal Forcing ``.pt`` checkpoint to a flat safetensors file.

Self Forcing saves ``{"generator": state_dict, "generator_ema": state_dict, ...}``
with keys under ``model.`` (``model._fsdp_wrapped_module.`` when saved from
FSDP). ComfyUI's "Load Diffusion Model" (UNETLoader) wants the bare Wan keys in
a safetensors file. Usage::

    python -m headforcing_core.convert self_forcing_dmd.pt self_forcing_dmd.safetensors --ema

The checkpoint is read with ``torch.load(weights_only=True)``: a file that needs
arbitrary pickled objects is refused, never executed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import zipfile
from typing import Mapping

import torch

from .errors import CheckpointError
from .wan_model import WanConfig

PREFIXES = ("model._fsdp_wrapped_module.", "_fsdp_wrapped_module.", "model.", "module.")
DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    else:
        sd = ckpt  # already a bare state dict
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"'{key}' is not a state dict")
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


def convert(in_path: str, out_path: str, ema: bool = False, dtype: str = "keep", overwrite: bool = False) -> WanConfig:
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    sd = extract_generator(load_checkpoint(in_path), ema=ema)
    cfg = WanConfig.from_state_dict(sd)
    save_flat(sd, out_path, DTYPES[dtype], {"converted_from": os.path.basename(in_path),
                                           "weights": "generator_ema" if ema else "generator",
                                           "converter": "headforcing_core.convert"}, overwrite)
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m headforcing_core.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="Self Forcing / Causal Forcing .pt checkpoint")
    ap.add_argument("output", help="flat .safetensors file for ComfyUI's models/diffusion_models")
    ap.add_argument("--ema", action="store_true", help="convert the EMA weights (generator_ema)")
    ap.add_argument("--dtype", default="keep", choices=sorted(DTYPES), help="cast floating weights")
    ap.add_argument("--force", action="store_true", help="replace an existing output file")
    args = ap.parse_args(argv)
    try:
        cfg = convert(args.input, args.output, args.ema, args.dtype, args.force)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: Wan2.1 T2V, dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
