// Head Forcing for ComfyUI: plays the frames a running sampler streams, at the video's own rate.
//
// Each chunk brings its frames (JPEG data URLs) and how much video each stands for (`frame_seconds`:
// 0.25 s for a latent→RGB frame, 4 video frames at 16 fps). The player shows them one after another
// for that long, so the panel runs at the speed of the video; when the sampler is faster than real
// time the queue is kept to two chunks and older frames are dropped (a live view shows what is being
// made now, not what was made a minute ago). It times itself: how long decoding and drawing one frame
// takes against the 62.5 ms a 16-fps frame may take (mean, 95th percentile, worst), and how late
// frames are shown.
//
// No ComfyUI here (DOM only). Exports only: ComfyUI's extension loader imports every .js file under
// web/, so loading this one on its own must do nothing.

export const FRAME_BUDGET_MS = 1000 / 16; // one frame of a 16-fps video

export class FramePlayer {
  constructor(canvas, onFrame = () => {}) {
    this.canvas = canvas;
    this.onFrame = onFrame;
    this.queue = [];
    this.playing = false;
    this.keep = 6; // frames kept waiting (two chunks of three)
    this.stats = { received: 0, shown: 0, dropped: 0, drawMsTotal: 0, drawMsMax: 0, lateMsMax: 0, late: 0 };
    this.drawMs = []; // the last 1000 draw times
  }

  /** Queue a chunk's frames (`frameSeconds` of video each). */
  push(frames, frameSeconds, chunk) {
    for (const src of frames) this.queue.push({ src, ms: 1000 * (frameSeconds || 0.25), chunk });
    this.stats.received += frames.length;
    this.keep = Math.max(this.keep, 2 * frames.length);
    while (this.queue.length > this.keep) {
      this.queue.shift();
      this.stats.dropped += 1;
    }
    if (!this.playing) this.play();
  }

  async play() {
    this.playing = true;
    let due = performance.now();
    while (this.queue.length) {
      const f = this.queue.shift();
      const t0 = performance.now();
      this.stats.lateMsMax = Math.max(this.stats.lateMsMax, t0 - due);
      if (t0 - due > f.ms) this.stats.late += 1; // shown more than a frame's time after it was due
      try {
        await this.draw(f.src);
      } catch {
        continue; // a frame that does not decode is skipped, never an error
      }
      const ms = performance.now() - t0;
      this.stats.shown += 1;
      this.stats.drawMsTotal += ms;
      this.stats.drawMsMax = Math.max(this.stats.drawMsMax, ms);
      this.drawMs.push(ms);
      if (this.drawMs.length > 1000) this.drawMs.shift();
      this.onFrame(f, this.summary());
      due = Math.max(t0, due) + f.ms;
      await new Promise((r) => setTimeout(r, Math.max(0, due - performance.now())));
    }
    this.playing = false;
  }

  async draw(src) {
    const img = new Image();
    img.src = src;
    await img.decode();
    const c = this.canvas;
    if (c.width !== img.naturalWidth || c.height !== img.naturalHeight) {
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
    }
    c.getContext("2d").drawImage(img, 0, 0);
  }

  /** The player's own timing: frames shown / dropped, draw time per frame (mean, 95th percentile, worst),
   *  lateness; it keeps up with a 16-fps stream when 95 % of its frames are drawn within a frame's time. */
  summary() {
    const s = this.stats;
    const sorted = [...this.drawMs].sort((a, b) => a - b);
    const p95 = sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(0.95 * sorted.length))] : 0;
    return {
      received: s.received, shown: s.shown, dropped: s.dropped, late: s.late,
      drawMsMean: s.shown ? s.drawMsTotal / s.shown : 0, drawMsP95: p95, drawMsMax: s.drawMsMax,
      lateMsMax: s.lateMsMax, keepsUp16: s.shown > 0 && p95 < FRAME_BUDGET_MS,
    };
  }
}
