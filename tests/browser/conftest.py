"""Browser harness: the REAL ComfyUI 0.3.75 (from .host/) with the pack, driven by Debian's Chromium.

Fixtures
--------
``ui_server`` (session): a ComfyUI server started with ``tools/comfyhost``'s ``ComfyServer`` in a
  temporary base directory holding the tiny random Wan2.1 model and Wan VAE (the e2e models),
  the test-only ``HFTest*`` nodes, a *planted* head profile ``hf_planted_heads.safetensors`` in
  ``models/headforcing`` (known labels, see :data:`PLANTED`), and frontend settings that skip
  the first-run template dialog. No ``--preview-method``: the sampler panel's thumbnail must
  not depend on it. Yields a :class:`UIServer` (a ``ComfyClient`` plus ``base_dir``,
  ``output_dir``, ``models``).
``chromium`` (session): a Playwright ``BrowserContext`` on ``/usr/bin/chromium`` (never a
  downloaded browser), launched headless with ``--no-sandbox --disable-gpu --no-first-run
  --disable-background-networking --disable-component-update --disable-sync --disable-quic``
  and a fresh user-data directory.
``ui`` (function): a new page on the server's UI, loaded and ready (our extension's ``setup``
  ran), with every console message and page error recorded. At teardown it fails the test if
  any of them came from the pack's extension, and keeps a screenshot of failing tests.

Everything is written to ``$HF_TEST_ARTIFACTS/browser`` (default ``test-artifacts/browser``):
screenshots, the server log, the console log of each test.

Without the host, Chromium or Playwright the tests skip with the reason; under
``python3 tools/host.py test`` (``HF_E2E_REQUIRED=1``) they fail instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("HF_TEST_ARTIFACTS", REPO / "test-artifacts")) / "browser"
REQUIRED = os.environ.get("HF_E2E_REQUIRED") == "1"
CHROMIUM = Path(os.environ.get("HF_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]
VIEWPORT = {"width": 1600, "height": 1000}
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PLANTED_PROFILE = "hf_planted_heads.safetensors"
PLANTED_LAYERS, PLANTED_HEADS = 6, 4
# the head map palette (nodes/messages.py TYPE_COLORS, also drawn into the heat-map PNG by nodes/heat_map.py)
PALETTE = {
    "local": (232, 126, 34),
    "anchor": (52, 101, 164),
    "memory": (46, 160, 90),
    "wave": (142, 68, 173),
    "veil": (22, 160, 160),
}


def planted_types(taxonomy: str) -> list[list[str]]:
    """The planted labels: every type appears in every row and every column."""
    names = {"head_forcing": ("local", "anchor", "memory"), "pyramid_forcing": ("anchor", "wave", "veil")}[taxonomy]
    shift = 0 if taxonomy == "head_forcing" else 1
    return [[names[(layer + 2 * head + shift) % 3] for head in range(PLANTED_HEADS)] for layer in range(PLANTED_LAYERS)]


from tools import comfyhost as host  # noqa: E402  (the host library behind tools/host.py)
ComfyError = host.ComfyError


def problem() -> str | None:
    if not CHROMIUM.exists():
        # always a skip: `tools/host.py build` installs it where apt is available (CI) and says so otherwise
        pytest.skip(f"no Chromium at {CHROMIUM}: `python3 tools/host.py build` installs Debian's chromium where "
                    "apt-get is available (as root); or `apt-get install chromium`")
    if not (host.VENV_PY.exists() and (host.COMFY / "main.py").exists()):
        return ".host is not built: run `python3 tools/host.py test` (or `python3 tools/host.py build`)"
    for mod in ("playwright", "torch", "safetensors"):
        try:
            __import__(mod)
        except ImportError:
            return (f"this python ({sys.executable}) lacks {mod}: run the tests under the host venv with "
                    "`python3 tools/host.py test tests/browser`")
    return None


def _skip_or_fail(reason: str):
    if REQUIRED:
        pytest.fail(f"browser tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def write_planted_profile(folder: Path) -> Path:
    from headforcing_core.policies import HeadLabels
    from headforcing_core.profiling import HeadProfile, save_profile

    labels = {tax: HeadLabels(tax, tuple(tuple(r) for r in planted_types(tax)), "planted by tests/browser")
              for tax in ("head_forcing", "pyramid_forcing")}
    model = {"dim": 128 * PLANTED_HEADS, "num_heads": PLANTED_HEADS, "num_layers": PLANTED_LAYERS,
             "patch_size": [1, 2, 2], "in_dim": 16, "out_dim": 16, "text_dim": 4096}
    profile = HeadProfile(model=model, labels_by_taxonomy=labels, taxonomy="head_forcing",
                          source="planted by tests/browser (known labels)")
    return save_profile(profile, folder / PLANTED_PROFILE)


# ------------------------------------------------------------------------------------------
# server


class UIServer(host.ComfyClient):
    def __init__(self, server, base: Path, models: dict):
        super().__init__(server.url, server)
        self.base_dir = Path(base)
        self.output_dir = self.base_dir / "output"
        self.models = models

    def log_text(self) -> str:
        return self.server.log_text()

    def outputs(self, entry: dict, ext: str | None = ".mp4") -> list[Path]:
        return host.output_files(entry, self.base_dir, ext)

    def get_raw(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    reason = problem()
    if reason:
        _skip_or_fail(reason)
    from tools import tiny_models as tiny
    base = host.prepare_base(tmp_path_factory.mktemp("browser_base"), test_nodes=True)
    models = {"wan": host.TINY_WAN_NAME, "vae": host.TINY_VAE_NAME}
    tiny.write_tiny_wan(base / "models" / "diffusion_models" / models["wan"], seed=0)
    tiny.write_tiny_wan_vae(base / "models" / "vae" / models["vae"], seed=0)
    write_planted_profile(base / "models" / "headforcing")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({
        "Comfy.TutorialCompleted": True,            # no template browser on first load
        "Comfy.Notification.ShowVersionUpdates": False,
        "Comfy.Minimap.Visible": False,
        "LiteGraph.Canvas.MinFontSizeForLOD": 0,    # full detail (and DOM widgets) at every zoom level
        "Comfy.Workflow.Persist": False,            # no restore of an earlier page's graph racing our loads
    }))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)  # files are overwritten (another session may share the folder)
    with contextlib.ExitStack() as stack:
        try:
            server, startup = stack.enter_context(host.test_server(base, ARTIFACTS))
        except ComfyError as e:
            pytest.fail(str(e), pytrace=False)
        client = UIServer(server, base, models)
        client.startup_seconds = startup
        yield client


# ------------------------------------------------------------------------------------------
# browser


@pytest.fixture(scope="session")
def chromium(ui_server):
    from playwright.sync_api import sync_playwright

    user_data = tempfile.mkdtemp(prefix="hf-chromium-")
    pw = sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(
            user_data, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            device_scale_factor=1)
    except Exception as e:  # noqa: BLE001 - report why Chromium did not start
        pw.stop()
        shutil.rmtree(user_data, ignore_errors=True)
        pytest.fail(f"Chromium ({CHROMIUM}) did not start: {e}", pytrace=False)
    try:
        yield context
    finally:
        context.close()
        pw.stop()
        shutil.rmtree(user_data, ignore_errors=True)


EXTENSION_RE = re.compile(r"headforcing", re.IGNORECASE)


@dataclass
class ConsoleEntry:
    kind: str          # console type ("error", "warning", ...) or "pageerror"
    text: str
    url: str = ""

    def from_extension(self, server_url: str = "") -> bool:
        # the frontend itself looks pack nodes up in the Comfy registry (api.comfy.org/comfy-nodes/<id>);
        # those requests fail offline and are not the extension's: it never talks to another host
        if self.url.startswith(("http://", "https://")) and server_url and not self.url.startswith(server_url):
            return False
        return bool(EXTENSION_RE.search(self.text) or EXTENSION_RE.search(self.url))


@dataclass
class UIPage:
    page: object
    server: UIServer
    console: list = field(default_factory=list)
    allowed: list = field(default_factory=list)  # regexes of expected extension messages

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def shot(self, name: str, **kw) -> Path:
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), **kw)
        return path

    def extension_problems(self) -> list[ConsoleEntry]:
        return [e for e in self.console
                if e.kind in ("error", "warning", "pageerror") and e.from_extension(self.server.url)
                and not any(re.search(a, e.text + " " + e.url) for a in self.allowed)]

    # ---- graph helpers (all through the real frontend) ---------------------------------------
    def load_workflow(self, workflow: dict) -> dict:
        """``app.loadGraphData`` like opening a file; returns what the frontend reported missing."""
        return self.js(LOAD_JS, workflow)

    def node_ids(self, comfy_class: str) -> list[int]:
        return self.js("(c) => app.graph._nodes.filter(n => n.comfyClass === c).map(n => n.id)", comfy_class)

    def focus_node(self, node_id, scale: float = 1.0) -> None:
        self.js("""([id, scale]) => { const n = app.graph.getNodeById(id); const c = app.canvas;
                   c.ds.scale = scale; c.ds.offset[0] = -n.pos[0] + 120; c.ds.offset[1] = -n.pos[1] + 170;
                   c.setDirty(true, true); }""", [node_id, scale])
        self.page.wait_for_timeout(300)

    def fit_view(self, node_ids=None, margin: float = 40, max_scale: float = 1.0) -> None:
        """Zoom and pan so the given nodes (default: all) fill the canvas."""
        self.js("""([ids, margin, maxScale]) => {
            const c = app.canvas, nodes = app.graph._nodes.filter(n => !ids || ids.includes(n.id));
            const b = nodes.map(n => n.boundingRect);
            const x0 = Math.min(...b.map(r => r[0])), y0 = Math.min(...b.map(r => r[1]));
            const x1 = Math.max(...b.map(r => r[0] + r[2])), y1 = Math.max(...b.map(r => r[1] + r[3]));
            const left = 70 + margin, top = 100 + margin;    // the side bar and the top bar cover the canvas
            const W = c.canvas.clientWidth - left - margin, H = c.canvas.clientHeight - top - margin;
            const scale = Math.min(maxScale, W / (x1 - x0), H / (y1 - y0));
            c.ds.scale = scale;
            c.ds.offset[0] = (left + (W - (x1 - x0) * scale) / 2) / scale - x0;
            c.ds.offset[1] = top / scale - y0;
            c.setDirty(true, true); }""", [node_ids, margin, max_scale])
        self.page.wait_for_timeout(400)

    def node_clip(self, node_ids, pad: float = 12) -> dict:
        """The screen rectangle around some nodes (for a cropped screenshot)."""
        x, y, w, h = self.js("""([ids, pad]) => {
            const c = app.canvas, r = c.canvas.getBoundingClientRect(), s = c.ds.scale, o = c.ds.offset;
            const b = app.graph._nodes.filter(n => ids.includes(n.id)).map(n => n.boundingRect);
            const x0 = Math.min(...b.map(q => q[0])), y0 = Math.min(...b.map(q => q[1]));
            const x1 = Math.max(...b.map(q => q[0] + q[2])), y1 = Math.max(...b.map(q => q[1] + q[3]));
            return [r.left + (x0 + o[0]) * s - pad, r.top + (y0 + o[1]) * s - pad,
                    (x1 - x0) * s + 2 * pad, (y1 - y0) * s + 2 * pad]; }""", [list(node_ids), pad])
        return {"x": max(0, x), "y": max(0, y), "width": w, "height": h}

    def shot_nodes(self, node_ids, name: str) -> Path:
        (ARTIFACTS / "docs").mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / "docs" / f"{name}.png"
        self.page.screenshot(path=str(path), clip=self.node_clip(node_ids))
        return path

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.js("() => document.querySelectorAll('.p-dialog').length"):
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    def queue_from_ui(self) -> None:
        self.page.locator('[data-testid="queue-button"]').first.click()


LOAD_JS = """
async (wf) => {
  const types = [...new Set(wf.nodes.map(n => n.type))];
  const unregistered = types.filter(t => !(t in LiteGraph.registered_node_types));
  window.__hfMissing = null;
  await app.loadGraphData(wf, true, true, null, { showMissingNodesDialog: true });
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText).filter(Boolean);
  return { unregistered, missing: window.__hfMissing, dialogs, nodes: app.graph._nodes.map(n => n.id) };
}
"""

READY_JS = """
() => window.app && app.graph && window.LiteGraph && LiteGraph.registered_node_types['HeadForcingARSampler']
      && document.querySelector('link[data-headforcing-css]') && app.canvas
      && document.querySelector('[data-testid="queue-button"]')
"""

PROBE_EXTENSION_JS = """
() => { if (window.__hfProbe) return; window.__hfProbe = true;
  app.registerExtension({ name: 'headforcing.tests.probe',
    afterConfigureGraph(missing) { window.__hfMissing = (missing || []).map(m => typeof m === 'string' ? m : m.type); } });
}
"""


@pytest.fixture
def ui(request, ui_server, chromium):
    page = chromium.new_page()
    entries: list[ConsoleEntry] = []

    def on_console(msg):
        loc = msg.location or {}
        entries.append(ConsoleEntry(msg.type, msg.text, loc.get("url", "") if isinstance(loc, dict) else ""))

    page.on("console", on_console)
    page.on("pageerror", lambda err: entries.append(ConsoleEntry("pageerror", f"{err}\n{getattr(err, 'stack', '')}")))
    page.on("requestfailed", lambda r: entries.append(ConsoleEntry("requestfailed", r.failure or "", r.url)))
    # no "Nodes 2.0" banner over the screenshots (the frontend keeps its dismissal in localStorage)
    page.add_init_script("try { localStorage.clear(); sessionStorage.clear(); "
                         "localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) {}")
    page.goto(ui_server.url, wait_until="domcontentloaded")
    page.wait_for_function(READY_JS, timeout=120_000)
    page.evaluate(PROBE_EXTENSION_JS)
    wrapper = UIPage(page, ui_server, entries)
    t0 = time.time()
    yield wrapper
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    log = "\n".join(f"[{e.kind}] {e.text} {e.url}".rstrip() for e in entries)
    (ARTIFACTS / f"{name}.console.txt").write_text(log + "\n")
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        try:
            wrapper.shot(f"FAILED_{name}")
        except Exception:  # noqa: BLE001
            pass
    problems = wrapper.extension_problems()
    page.close()
    if problems and not failed:
        pytest.fail("console errors/warnings from the Head Forcing extension:\n" +
                    "\n".join(f"[{e.kind}] {e.text} {e.url}" for e in problems), pytrace=False)
    request.node.user_properties.append(("page_seconds", round(time.time() - t0, 1)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep
