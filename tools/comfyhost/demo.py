"""``demo``: the long-video example workflow end to end in a real ComfyUI, with the real models
when they are present under their standard names, else with tiny random models (a pipeline
demo: the video is noise)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .build import build
from .paths import (DEMO_BASE, DEMO_WORKFLOW_CANDIDATES, REAL_MODELS, REPO, TINY_DEMO_SIZE, TINY_VAE_NAME,
                    TINY_WAN_NAME, VENV_PY)
from .proc import log, run
from .server import ComfyClient, ComfyError, ComfyServer, free_port, output_files, prepare_base


def banner(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    print("\n" + "!" * width, flush=True)
    for x in lines:
        print(f"! {x.ljust(width - 4)} !", flush=True)
    print("!" * width + "\n", flush=True)


def find_real_models(base: Path) -> dict | None:
    chosen = {}
    for folder, names in REAL_MODELS.items():
        for n in names:
            if (base / "models" / folder / n).exists():
                chosen[folder] = n
                break
        else:
            return None
    return chosen


def write_tiny_models(base: Path) -> dict:
    """Write the tiny random models (in the venv's python: it has torch)."""
    wan = base / "models" / "diffusion_models" / TINY_WAN_NAME
    vae = base / "models" / "vae" / TINY_VAE_NAME
    # rewritten every time (2-3 s) so they follow the current reference backbone
    run([VENV_PY, REPO / "tools" / "tiny_models.py", "--wan", wan, "--vae", vae])
    return {"diffusion_models": TINY_WAN_NAME, "vae": TINY_VAE_NAME}


def default_workflow() -> Path | None:
    for c in DEMO_WORKFLOW_CANDIDATES:
        if (REPO / c).exists():
            return REPO / c
    api = sorted((REPO / "workflows" / "api").glob("*long*.json"))
    return api[0] if api else None


def patch_workflow(wf: dict, models: dict, tiny: bool, overrides: dict, seed: int | None) -> dict:
    wf = json.loads(json.dumps(wf))
    if tiny:
        # No tiny umT5 exists: replace each text encoder with the test-only conditioning
        # node and drop the text-encoder loaders.
        for nid, node in list(wf.items()):
            if node.get("class_type") in ("CLIPTextEncode",):
                text = str(node.get("inputs", {}).get("text", ""))
                node_seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
                wf[nid] = {"class_type": "HFTestConditioning",
                           "inputs": {"seed": node_seed, "length": 512},
                           "_meta": {"title": f"tiny demo: random conditioning for {text[:40]!r}"}}
        for nid, node in list(wf.items()):
            if node.get("class_type") in ("CLIPLoader",):
                del wf[nid]
    for node in wf.values():
        ins = node.get("inputs", {})
        ct = node.get("class_type")
        if ct == "UNETLoader":
            ins["unet_name"] = models["diffusion_models"]
            ins["weight_dtype"] = "default"
        elif ct == "CLIPLoader" and "text_encoders" in models:
            ins["clip_name"] = models["text_encoders"]
        elif ct == "VAELoader":
            ins["vae_name"] = models["vae"]
        if ct.startswith("HFTest"):
            continue  # their 'length' is a token count, their seed picks the random conditioning
        for k, v in overrides.items():
            if v is not None and k in ins and not isinstance(ins[k], list):
                ins[k] = v
        if seed is not None:
            for k in ("seed", "noise_seed"):
                if k in ins and not isinstance(ins[k], list):
                    ins[k] = seed
    dangling = [(nid, k, v[0]) for nid, node in wf.items() for k, v in node.get("inputs", {}).items()
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in wf]
    if dangling:
        raise SystemExit("the tiny demo removed the text-encoder loaders, but these inputs still use them "
                         f"(node, input, missing node): {dangling}; feed CONDITIONING from CLIPTextEncode nodes")
    return wf


def cmd_demo(args) -> int:
    build()
    base = DEMO_BASE.resolve()
    prepare_base(base, test_nodes=True)
    wf_path = Path(args.workflow) if args.workflow else default_workflow()
    if wf_path is None or not wf_path.exists():
        log(f"no API workflow found (looked for {', '.join(DEMO_WORKFLOW_CANDIDATES)}); pass --workflow")
        return 2
    real = None if args.tiny else find_real_models(base)
    if real:
        models = real
        log(f"real models: {models}")
        overrides = {"width": args.width, "height": args.height, "length": args.length}
    else:
        models = write_tiny_models(base)
        overrides = {"width": args.width or TINY_DEMO_SIZE[0], "height": args.height or TINY_DEMO_SIZE[1],
                     "length": args.length}
        banner([
            "PIPELINE DEMO WITH TINY RANDOM MODELS: THE VIDEO WILL BE NOISE, NOT A VIDEO OF THE PROMPT.",
            "It proves the graph runs end to end in a real ComfyUI, nothing about quality.",
            "For a real video put the real models under their standard names in",
            f"  {base}/models/diffusion_models/ one of {REAL_MODELS['diffusion_models']}",
            f"  {base}/models/text_encoders/    one of {REAL_MODELS['text_encoders']}",
            f"  {base}/models/vae/              {REAL_MODELS['vae'][0]}",
            "Text prompts are replaced by random CONDITIONING (test node HFTestConditioning):",
            "the umT5 text encoder cannot be made tiny.",
        ])
    wf = patch_workflow(json.loads(wf_path.read_text()), models, tiny=not real,
                        overrides=overrides, seed=args.seed)
    (base / "last_demo_prompt.json").write_text(json.dumps(wf, indent=2))
    port = args.port or free_port()
    server = ComfyServer(base, port=port, log_path=base / "comfyui.log", extra_args=["--preview-method", "auto"])
    log(f"starting ComfyUI on {server.url} (log {server.log_path})")
    t0 = time.time()
    with server:
        client = ComfyClient(server.url, server)
        log(f"server up in {time.time() - t0:.0f} s; submitting {wf_path.relative_to(REPO) if wf_path.is_relative_to(REPO) else wf_path}")
        t1 = time.time()
        try:
            entry = client.run(wf, timeout=args.timeout)
        except ComfyError as e:
            log(f"FAILED: {e}")
            log(f"server log: {server.log_path}")
            return 1
        log(f"done in {time.time() - t1:.0f} s")
    videos = output_files(entry, base, ".mp4") or output_files(entry, base)
    if not videos:
        log(f"the workflow finished but saved no file; outputs: {json.dumps(entry.get('outputs'))[:2000]}")
        return 1
    for v in videos:
        log(f"wrote {v}")
    if not real:
        banner(["Reminder: tiny random models -> the MP4 shows noise. This was a pipeline demo."])
    return 0
