"""What a MODEL's ComfyUI patches ask for, and which of it the Head Forcing sampler does.

The sampler runs the Wan module's layers itself (``headforcing_core.backbone.WanRunner``: its
own attention, KV cache, schedule and no CFG); it never goes through KSampler, ``apply_model``
or ``WanModel.forward``. So of what a ModelPatcher can carry (ComfyUI 0.3.75,
``comfy/model_patcher.py``):

* **weight patches** (``patcher.patches``: LoRA from LoraLoaderModelOnly and other weight
  adapters) are applied — ``load_models_gpu`` merges them into the weights the sampler's
  layers use, exactly as merging the LoRA into the file does;
* everything else is **not applied**, and is reported instead of silently dropped:
  ``model_options["transformer_options"]`` entries (``patches`` such as attn1/attn2 patches,
  ``patches_replace`` attention/block replacements, ``rope_options`` from ScaleROPE,
  ``wrappers``, ``callbacks``, …), ``model_function_wrapper``, the CFG functions
  (``sampler_cfg_function``, ``sampler_pre_cfg_function``, ``sampler_post_cfg_function``,
  ``sampler_calc_cond_batch_function``), ``denoise_mask_function``, the patcher's sampling
  wrappers and sampling-time callbacks (EasyCache, TorchCompileModel, …), hook patches, and
  object patches such as ``model_sampling`` (ModelSamplingSD3: the sampler's ``shift`` input
  sets the schedule) or ``manual_cast_dtype`` (ModelComputeDtype: the sampler computes in
  the dtype the report names).

Pure Python on plain attributes: imports nothing from ComfyUI.
"""
from __future__ import annotations

from typing import Any, Mapping

WHY_BLOCKS = "the sampler runs the Wan blocks itself (its own attention and KV cache)"
WHY_SAMPLING = "the sampler does not go through ComfyUI's KSampler / apply_model"
WHY_CFG = "these distilled models sample without CFG (one conditional pass per step)"

CFG_FUNCTIONS = {
    "sampler_cfg_function": "CFG function",
    "sampler_pre_cfg_function": "pre-CFG function",
    "sampler_post_cfg_function": "post-CFG function",
    "sampler_calc_cond_batch_function": "cond-batch function",
}
# model_options keys that only qualify another entry (reported with it, or harmless alone)
QUIET_OPTIONS = {"transformer_options", "disable_cfg1_optimization"}
# callbacks ModelPatcher itself runs around loading (load_models_gpu), which the sampler uses
LOAD_CALLBACKS = {"on_clone", "on_load_after", "on_detach_after", "on_inject_model", "on_eject_model"}
IDENTITY_ROPE = {"scale_x": 1.0, "scale_y": 1.0, "scale_t": 1.0, "shift_x": 0.0, "shift_y": 0.0, "shift_t": 0.0}


def _count(value: Any) -> int:
    """Callables in a patch entry: a list, a dict of lists (wrappers/callbacks by key), or one."""
    if isinstance(value, Mapping):
        return sum(_count(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return len(value)
    return 0 if value is None else 1


def _transformer_option_notes(to: Mapping) -> list[str]:
    notes = []
    for key, value in to.items():
        if key == "patches":
            for name, fns in (value or {}).items():
                if _count(fns):
                    notes.append(f"transformer patch '{name}' ({_count(fns)}) — {WHY_BLOCKS}")
        elif key == "patches_replace":
            for name, table in (value or {}).items():
                if table:
                    targets = ", ".join(sorted({str(t[0]) if isinstance(t, tuple) else str(t) for t in table}))
                    notes.append(f"'{name}' replacement patch for {len(table)} block(s) ({targets}) — {WHY_BLOCKS}")
        elif key == "rope_options":
            changed = {k: v for k, v in (value or {}).items() if IDENTITY_ROPE.get(k) != v}
            if changed:
                values = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                   for k, v in sorted(changed.items()))
                notes.append(f"RoPE options ({values}; ScaleROPE) — positions come from the cache policy's "
                             "RoPE mode")
        elif key in ("wrappers", "callbacks"):
            for kind, fns in (value or {}).items():
                if _count(fns):
                    notes.append(f"transformer_options {key[:-1]} '{kind}' ({_count(fns)}) — {WHY_SAMPLING}")
        elif value not in (None, {}, [], ()):
            notes.append(f"transformer_options['{key}'] — {WHY_BLOCKS}")
    return notes


def unhonoured_patches(model) -> list[str]:
    """Human-readable notes, one per patch on ``model`` (a ComfyUI ModelPatcher, read by attribute)
    that the Head Forcing sampler does not apply. Empty when nothing is dropped."""
    notes: list[str] = []
    options = getattr(model, "model_options", None) or {}
    notes += _transformer_option_notes(options.get("transformer_options") or {})
    for key, label in CFG_FUNCTIONS.items():
        if _count(options.get(key)):
            notes.append(f"{label} ({key}, {_count(options[key])}) — {WHY_CFG}")
    if options.get("model_function_wrapper") is not None:
        notes.append(f"model function wrapper (model_function_wrapper) — {WHY_SAMPLING}")
    if options.get("denoise_mask_function") is not None:
        notes.append(f"denoise mask function — {WHY_SAMPLING}")
    known = QUIET_OPTIONS | set(CFG_FUNCTIONS) | {"model_function_wrapper", "denoise_mask_function"}
    for key, value in options.items():
        if key not in known and value not in (None, {}, [], (), False):
            notes.append(f"model_options['{key}'] — {WHY_SAMPLING}")

    for kind, fns in (getattr(model, "wrappers", None) or {}).items():
        if _count(fns):
            keys = ", ".join(str(k) for k, v in fns.items() if _count(v)) if isinstance(fns, Mapping) else ""
            notes.append(f"'{kind}' wrapper ({keys or _count(fns)}) — {WHY_SAMPLING}")
    for kind, fns in (getattr(model, "callbacks", None) or {}).items():
        if kind not in LOAD_CALLBACKS and _count(fns):
            notes.append(f"'{kind}' callback ({_count(fns)}) — {WHY_SAMPLING}")
    if getattr(model, "hook_patches", None):
        notes.append(f"hook weight patches ({len(model.hook_patches)} hooks; Create Hook LoRA) — "
                     "they are applied per conditioning while KSampler samples, which this sampler does not do")

    for name in getattr(model, "object_patches", None) or {}:
        if name == "model_sampling":
            notes.append("model_sampling object patch (ModelSamplingSD3 / ModelSamplingDiscrete …) — the "
                         "schedule is the sampler's own flow matching; set it with the 'shift' input")
        elif name == "manual_cast_dtype":
            notes.append("compute dtype patch (ModelComputeDtype) — the sampler computes in the model's own "
                         "weight / manual-cast dtype (named on the report's time line)")
        else:
            notes.append(f"object patch '{name}' — the sampler calls the Wan module's layers directly and "
                         "does not use a replaced attribute")
    return notes


def weight_patch_count(model) -> int:
    """How many weights carry patches (LoRA and other weight adapters) that loading applies."""
    return sum(1 for v in (getattr(model, "patches", None) or {}).values() if v)


def patch_report(model) -> list[str]:
    """Report lines: the applied weight patches, then each patch that is not applied."""
    lines = []
    n = weight_patch_count(model)
    if n:
        lines.append(f"model patches: {n} patched weights (LoRA / weight adapters) applied, merged into the "
                     "weights at load")
    dropped = unhonoured_patches(model)
    if dropped:
        lines.append(f"model patches NOT applied by this sampler ({len(dropped)}):")
        lines += [f"  - {note}" for note in dropped]
    return lines
