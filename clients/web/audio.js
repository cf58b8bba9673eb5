// Audio in and out for the page: microphone -> PCM16 chunks, PCM16 24 kHz deltas -> speakers.
//
// One AudioContext serves both directions. We ask for 24 kHz (the server's native rate) but
// take whatever the browser gives: the input rate is announced to the server in
// session.update, and output buffers are created at 24 kHz and resampled by the browser.

export const OUTPUT_RATE = 24000;
const CHUNK_MS = 100;
const LEAD_S = 0.05;          // first chunk starts this far ahead, so it is never cut

export function createContext() {
  const Ctx = window.AudioContext || window.webkitAudioContext;
  try {
    return new Ctx({ sampleRate: OUTPUT_RATE, latencyHint: "interactive" });
  } catch (e) {
    return new Ctx({ latencyHint: "interactive" });  // some browsers refuse a chosen rate
  }
}

// ---- microphone ---------------------------------------------------------------------------
export class Microphone {
  constructor(ctx, onChunk) {
    this.ctx = ctx;
    this.onChunk = onChunk;     // (ArrayBuffer of PCM16 at ctx.sampleRate) => void
    this.stream = null;
    this.node = null;
    this.source = null;
    this.sink = null;
  }

  get rate() { return this.ctx.sampleRate; }

  async start() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("This page needs HTTPS (or localhost) to use the microphone.");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    try {
      this.source = this.ctx.createMediaStreamSource(this.stream);
    } catch (e) {
      // Firefox cannot join a mic to a context at another rate: capture at the device's own
      // rate in a context of our own (the session is told the rate, the server resamples).
      this.ctx = new (window.AudioContext || window.webkitAudioContext)();
      this.ownCtx = true;
      this.source = this.ctx.createMediaStreamSource(this.stream);
    }
    // A muted sink keeps the graph pulling samples without playing the mic back.
    this.sink = this.ctx.createGain();
    this.sink.gain.value = 0;
    this.sink.connect(this.ctx.destination);
    if (this.ctx.audioWorklet) {
      await this.ctx.audioWorklet.addModule("mic-worklet.js");
      this.node = new AudioWorkletNode(this.ctx, "mic-capture", {
        numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1,
        processorOptions: { chunkMs: CHUNK_MS },
      });
      this.node.port.onmessage = (e) => this.onChunk(e.data);
    } else {
      this.node = this.scriptProcessorFallback();
    }
    this.source.connect(this.node);
    this.node.connect(this.sink);
  }

  // Browsers without AudioWorklet (old Safari): the deprecated main-thread processor.
  scriptProcessorFallback() {
    const node = this.ctx.createScriptProcessor(2048, 1, 1);
    const size = Math.round(this.ctx.sampleRate * CHUNK_MS / 1000);
    let buf = new Int16Array(size), fill = 0;
    node.onaudioprocess = (e) => {
      const ch = e.inputBuffer.getChannelData(0);
      for (let i = 0; i < ch.length; i++) {
        const s = Math.max(-1, Math.min(1, ch[i]));
        buf[fill++] = s < 0 ? s * 32768 : s * 32767;
        if (fill === size) { this.onChunk(buf.buffer); buf = new Int16Array(size); fill = 0; }
      }
    };
    return node;
  }

  stop() {
    for (const n of [this.source, this.node, this.sink]) { try { n && n.disconnect(); } catch (e) {} }
    if (this.node && this.node.port) this.node.port.onmessage = null;
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.stream = this.node = this.source = this.sink = null;
    if (this.ownCtx) this.ctx.close();
  }
}

// ---- playback -----------------------------------------------------------------------------
// Deltas are scheduled back to back on the context clock (gapless); `flush()` stops them all
// at once and says how many ms of the item the listener actually heard, for the truncate event.
export class Player {
  constructor(ctx, onIdle) {
    this.ctx = ctx;
    this.onIdle = onIdle;       // called when the queue has played out
    this.itemId = null;
    this.sources = [];          // {node, start, duration}
    this.nextTime = 0;
    this.scheduledMs = 0;       // of the current item
    this.chunks = 0;            // deltas scheduled, all items (for tests and the status line)
  }

  get playing() { return this.sources.length > 0 && this.ctx.currentTime < this.nextTime; }

  // Schedule one delta right after the previous one; returns its duration in ms.
  enqueue(itemId, b64) {
    if (itemId !== this.itemId) {
      this.flush();             // a new answer replaces whatever is left of the old one
      this.itemId = itemId;
      this.scheduledMs = 0;
      this.heard = 0;
    }
    const pcm = base64ToInt16(b64);
    if (pcm.length === 0) return 0;
    const buffer = this.ctx.createBuffer(1, pcm.length, OUTPUT_RATE);
    const out = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
    const node = this.ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(this.ctx.destination);
    const start = Math.max(this.nextTime, this.ctx.currentTime + LEAD_S);
    node.start(start);
    const entry = { node, start, duration: buffer.duration };
    node.onended = () => {
      const i = this.sources.indexOf(entry);
      if (i >= 0) {
        this.sources.splice(i, 1);
        this.heard += entry.duration;
      }
      if (this.sources.length === 0 && this.onIdle) this.onIdle();
    };
    this.sources.push(entry);
    this.nextTime = start + buffer.duration;
    this.scheduledMs += buffer.duration * 1000;
    this.chunks += 1;
    return buffer.duration * 1000;
  }

  // ms of the current item played so far: finished buffers plus the part of live ones.
  playedMs() {
    const now = this.ctx.currentTime;
    let s = this.heard || 0;
    for (const e of this.sources) s += Math.min(Math.max(now - e.start, 0), e.duration);
    return Math.floor(s * 1000);
  }

  // Stop everything now. Returns {itemId, playedMs} when audio was cut short, else null.
  flush() {
    if (this.sources.length === 0) return null;
    const cut = { itemId: this.itemId, playedMs: this.playedMs() };
    for (const e of this.sources) {
      e.node.onended = null;
      try { e.node.stop(); } catch (err) {}
      e.node.disconnect();
    }
    this.sources = [];
    this.nextTime = 0;
    if (this.onIdle) this.onIdle();
    return cut;
  }
}

// ---- encoding -----------------------------------------------------------------------------
export function int16ToBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

export function base64ToInt16(b64) {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length - (s.length % 2));
  for (let i = 0; i < bytes.length; i++) bytes[i] = s.charCodeAt(i);
  return new Int16Array(bytes.buffer);  // PCM16 little-endian, as every browser platform is
}
