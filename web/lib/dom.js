// Head Forcing for ComfyUI: DOM and text helpers shared by the widgets (no ComfyUI here).
//
// Exports only: ComfyUI's extension loader imports every .js file under web/ (this one too), so
// loading it on its own must do nothing.

const GiB = 1024 ** 3;

export function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

export function gib(bytes) {
  // GiB with 2 decimals, as the server's summaries print it; small figures in MiB
  return bytes >= 0.1 * GiB ? `${(bytes / GiB).toFixed(2)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

export function pct(x) {
  return x === null || x === undefined ? "–" : `${Math.round(x * 100)} %`;
}

export function fmtSeconds(s) {
  if (!isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${(s - 60 * m).toFixed(1).padStart(4, "0")} s`;
}
