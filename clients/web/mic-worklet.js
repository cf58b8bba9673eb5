// Microphone capture on the audio thread: float samples -> PCM16 chunks of ~100 ms.
// Posting every 128-sample render quantum would flood the main thread (375 messages/s at
// 48 kHz); one message per chunk keeps the socket at ten small events a second.
class MicCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = (options && options.processorOptions && options.processorOptions.chunkMs) || 100;
    this.size = Math.round(sampleRate * chunkMs / 1000);
    this.buf = new Int16Array(this.size);
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const ch = input[0];
    for (let i = 0; i < ch.length; i++) {
      const s = Math.max(-1, Math.min(1, ch[i]));
      this.buf[this.fill++] = s < 0 ? s * 32768 : s * 32767;
      if (this.fill === this.size) {
        this.port.postMessage(this.buf.buffer, [this.buf.buffer]);
        this.buf = new Int16Array(this.size);
        this.fill = 0;
      }
    }
    return true;
  }
}

registerProcessor("mic-capture", MicCapture);
