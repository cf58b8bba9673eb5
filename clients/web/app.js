// omni2 web client: one WebSocket speaking the OpenAI Realtime protocol (GA event names),
// microphone and camera in, streamed speech and transcript out. No build step, no imports
// from anywhere but this server.
import { Microphone, Player, createContext, int16ToBase64 } from "./audio.js";

const FRAME_INTERVAL_MS = 1100;   // the server keeps at most one camera frame per second
const FRAME_MAX_SIDE = 512;       // the vision encoder sees 224x224; more only costs bandwidth
const FRAME_QUALITY = 0.8;
const MIN_PTT_MS = 150;           // the server refuses commits under 100 ms of audio
const KEY_SUBPROTOCOL = "openai-insecure-api-key.";

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"), log: $("log"), hint: $("hint"), connect: $("connect"), mic: $("mic"),
  camera: $("camera"), stop: $("stop"), ptt: $("ptt"), text: $("text"), send: $("send"),
  form: $("text-form"), url: $("url"), key: $("key"), preview: $("preview"),
  cameraBox: $("camera-box"), flip: $("flip"), listening: $("listening"),
  listeningLabel: $("listening-label"), speaking: $("speaking"), speakingLabel: $("speaking-label"),
  fallback: $("fallback-notice"),
};

const app = {
  ws: null, ctx: null, mic: null, player: null, ready: false, mode: "vad",
  pttHeld: false, pttSentMs: 0, response: null,      // {id, itemId, live}
  minting: false,                                     // trading the API key for a client secret
  muted: new Set(),                                   // answers cut off: late audio is dropped
  camera: { stream: null, timer: null, facing: "user", busy: false },
  bubbles: new Map(),                                 // item_id -> element
  closeInfo: null,
};

// Counters the page test reads (window.omni2.stats); harmless for users.
const stats = {
  audioChunksSent: 0, audioDeltas: 0, scheduledMs: 0, framesSent: 0, lastFrame: null,
  truncates: 0, cancels: 0, events: {}, errors: [], inputRate: null, statuses: [],
  clientSecret: false,
};
window.omni2 = { app, stats };

ui.url.value = defaultUrl();

function defaultUrl() {
  if (location.protocol !== "http:" && location.protocol !== "https:") return "ws://127.0.0.1:8000/v1/realtime";
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
}

// ---- connection ---------------------------------------------------------------------------
function setState(state, label) {
  ui.state.dataset.state = state;
  ui.state.textContent = label || state;
  const on = state === "connected";
  ui.connect.textContent = on || state === "connecting" ? "Disconnect" : "Connect";
  ui.connect.classList.toggle("primary", !on);
  for (const el of [ui.mic, ui.camera, ui.text, ui.send, ui.ptt]) el.disabled = !on;
  ui.stop.disabled = !on;
}

async function connect() {
  if (app.minting) return;                           // a client secret is on its way
  if (app.ws) { disconnect(); return; }
  app.ctx = app.ctx || createContext();
  app.ctx.resume();                                  // inside the click: allowed to start
  app.player = app.player || new Player(app.ctx, () => setSpeaking(false));
  const protocols = ["realtime"];
  const key = ui.key.value.trim();
  if (key) {
    setState("connecting");
    app.minting = true;
    let secret;
    try {
      secret = await clientSecret(key);
    } catch (e) {
      systemNote(e.message);
      setState("error", "disconnected");
      return;
    } finally {
      app.minting = false;
    }
    protocols.push(KEY_SUBPROTOCOL + secret);        // browsers cannot send Authorization
  }
  let ws;
  try {
    ws = new WebSocket(ui.url.value.trim(), protocols);
  } catch (e) {
    showError(`Bad server address: ${e.message}`);
    return;
  }
  app.ws = ws;
  app.ready = false;
  app.closeInfo = null;
  ui.fallback.hidden = true;                         // until this server says what it serves
  setState("connecting");
  ws.onmessage = (m) => {
    let event;
    try { event = JSON.parse(m.data); } catch (e) { return; }
    onEvent(event);
  };
  ws.onclose = (e) => {
    if (app.ws !== ws) return;
    app.ws = null;
    app.ready = false;
    stopMic();
    stopCamera();
    interrupt(false);
    const why = app.closeInfo || (e.code === 1000 || e.code === 1005 ? "" : `closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
    if (why) systemNote(why);
    setState(why ? "error" : "disconnected", "disconnected");
  };
  ws.onerror = () => { if (!app.ready) app.closeInfo = app.closeInfo || "Cannot reach the server (or the API key was refused)."; };
}

// The WebSocket carries an ephemeral client secret, never the long-lived key: the key is
// traded for one (POST /v1/realtime/client_secrets, 60 s to connect). A key that is already
// a secret ("ek_...", e.g. handed out by your backend) is used as it is; a server that mints
// none (or another host this page may not fetch from) gets the key itself, as before.
async function clientSecret(key) {
  if (key.startsWith("ek_")) return key;
  let resp;
  try {
    resp = await fetch(secretsUrl(ui.url.value.trim()), {
      method: "POST",
      headers: { "Authorization": `Bearer ${key}`, "Content-Type": "application/json" },
      body: JSON.stringify({ expires_after: { anchor: "created_at", seconds: 60 }, session: { type: "realtime" } }),
    });
  } catch (e) {
    return key;
  }
  if (resp.status === 401 || resp.status === 403) throw new Error("The server refused the API key.");
  if (!resp.ok) return key;
  stats.clientSecret = true;
  return (await resp.json()).value;
}

function secretsUrl(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = url.pathname.replace(/\/+$/, "") + "/client_secrets";
  url.search = "";
  return url.toString();
}

function disconnect() {
  const ws = app.ws;
  if (!ws) return;
  interrupt(true);
  ws.close(1000);
}

function send(type, fields = {}) {
  if (!app.ws || app.ws.readyState !== WebSocket.OPEN) return false;
  app.ws.send(JSON.stringify({ type, ...fields }));
  return true;
}

function configureSession() {
  const rate = app.mic ? app.mic.rate : app.ctx.sampleRate;
  // omni2_extensions: this page also wants omni2's own events (context.truncated)
  send("session.update", { session: { type: "realtime", omni2_extensions: true, audio: { input: {
    format: { type: "audio/pcm", rate },
    turn_detection: app.mode === "vad" ? { type: "server_vad" } : null,
  } } } });
}

// ---- server events ------------------------------------------------------------------------
function onEvent(e) {
  stats.events[e.type] = (stats.events[e.type] || 0) + 1;
  switch (e.type) {
    case "session.created":
      // omni2 extension: the server has no real checkpoint and serves its tiny random model.
      ui.fallback.hidden = !(e.session && e.session.model_fallback);
      setState("connected");
      configureSession();
      break;
    case "session.updated": {
      const fmt = e.session && e.session.audio && e.session.audio.input && e.session.audio.input.format;
      stats.inputRate = fmt ? fmt.rate : null;   // mic audio flows only at the agreed rate
      if (!app.ready) {
        app.ready = true;
        if (ui.hint) ui.hint.remove();
        startMic();
      }
      break;
    }
    case "input_audio_buffer.speech_started":
      setListening(true);
      interrupt(false);                  // barge-in: the user talks over the answer
      break;
    case "input_audio_buffer.speech_stopped":
      setListening(false);
      break;
    case "conversation.item.added":
      onItemAdded(e.item);
      break;
    case "response.created":
      app.response = { id: e.response.id, itemId: null, live: true };
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      appendText(e.item_id, e.delta);
      break;
    case "response.output_audio_transcript.done":
      setText(e.item_id, e.transcript);
      break;
    case "response.output_text.done":
      setText(e.item_id, e.text);
      break;
    case "response.output_audio.delta":
      if (app.muted.has(e.item_id)) break;   // sent before the server saw our cancel
      stats.scheduledMs += app.player.enqueue(e.item_id, e.delta);
      stats.audioDeltas += 1;
      setSpeaking(true);
      break;
    case "response.done":
      onResponseDone(e.response);
      break;
    case "conversation.item.truncated":
      meta(e.item_id, `heard ${(e.audio_end_ms / 1000).toFixed(1)} s`);
      break;
    case "conversation.context.truncated":   // omni2: the model's window dropped these turns
      for (const id of e.item_ids || []) meta(id, "no longer in the model's memory");
      break;
    case "error":
      onError(e.error || {});
      break;
  }
}

function onItemAdded(item) {
  if (!item || item.type !== "message") return;
  if (item.role === "assistant") {
    if (app.response && !app.response.itemId) app.response.itemId = item.id;
    bubble(item.id, "assistant", "").classList.add("live");
    return;
  }
  const parts = (item.content || []).map((c) =>
    c.type === "input_text" ? c.text : c.type === "input_audio" ? "(spoken question)" : c.type === "input_image" ? "(picture)" : "");
  bubble(item.id, "user", parts.filter(Boolean).join(" "));
}

function onResponseDone(resp) {
  stats.statuses.push(resp.status);
  const live = app.response && app.response.id === resp.id;
  if (live) app.response.live = false;
  const item = (resp.output || [])[0];
  const id = item ? item.id : null;
  if (id && app.bubbles.has(id)) app.bubbles.get(id).classList.remove("live");
  if (resp.status === "cancelled") {
    interrupt(false);
    const reason = resp.status_details && resp.status_details.reason;
    if (id) { app.bubbles.get(id)?.classList.add("cancelled"); meta(id, reason === "turn_detected" ? "interrupted" : "stopped"); }
  } else if (resp.status === "failed") {
    const err = resp.status_details && resp.status_details.error;
    if (id) meta(id, "failed");
    showError(`The answer failed: ${err ? err.message : "unknown error"}`);
  }
}

function onError(err) {
  stats.errors.push(err.code || "error");
  if (err.code === "server_busy" || err.code === "model_not_ready") {
    app.closeInfo = err.message;       // the socket closes with 1013 right after this
  }
  showError(err.message || err.code || "error");
}

// ---- conversation view --------------------------------------------------------------------
function bubble(id, role, text) {
  let el = id ? app.bubbles.get(id) : null;
  if (!el) {
    el = document.createElement("div");
    el.className = `bubble ${role}`;
    el.dataset.role = role;
    if (id) { el.dataset.item = id; app.bubbles.set(id, el); }
    const body = document.createElement("span");
    body.className = "text";
    el.appendChild(body);
    ui.log.appendChild(el);
    if (app.bubbles.size > 200) {      // long sessions: keep the page light
      const [oldId, oldEl] = app.bubbles.entries().next().value;
      oldEl.remove(); app.bubbles.delete(oldId);
    }
  }
  if (text) el.querySelector(".text").textContent = text;
  ui.log.scrollTop = ui.log.scrollHeight;
  return el;
}

function appendText(id, delta) {
  const el = bubble(id, "assistant", "");
  el.querySelector(".text").textContent += delta;
  ui.log.scrollTop = ui.log.scrollHeight;
}

function setText(id, text) { bubble(id, "assistant", "").querySelector(".text").textContent = text; }

function meta(id, note) {
  const el = app.bubbles.get(id);
  if (!el) return;
  let m = el.querySelector(".meta");
  if (!m) { m = document.createElement("span"); m.className = "meta"; el.appendChild(m); }
  m.textContent = note;
}

function systemNote(text) { bubble(null, "system", text); }
function showError(text) { bubble(null, "error", text); }

function setListening(on) {
  ui.listening.classList.toggle("on", on);
  ui.listeningLabel.textContent = on ? "hearing you" : "idle";
}

function setSpeaking(on) {
  ui.speaking.classList.toggle("on", on);
  ui.speakingLabel.textContent = on ? "speaking" : "silent";
}

// ---- stopping the answer ------------------------------------------------------------------
// Flush local playback; tell the server how much of the item was really heard so the
// conversation remembers only that. With `cancel`, also stop the generation itself.
function interrupt(cancel) {
  if (cancel && app.response && app.response.live) {
    if (send("response.cancel")) stats.cancels += 1;
    app.response.live = false;
  }
  if (app.response && app.response.itemId) app.muted.add(app.response.itemId);
  const cut = app.player ? app.player.flush() : null;
  if (cut && cut.itemId && app.ws) {
    if (send("conversation.item.truncate", { item_id: cut.itemId, content_index: 0, audio_end_ms: cut.playedMs })) {
      stats.truncates += 1;
    }
  }
}

// ---- microphone ---------------------------------------------------------------------------
async function startMic() {
  if (app.mic) return;
  const mic = new Microphone(app.ctx, onMicChunk);
  app.mic = mic;
  try {
    await mic.start();
    ui.mic.setAttribute("aria-pressed", "true");
    ui.mic.textContent = "Mic on";
    if (mic.rate !== stats.inputRate) configureSession();
  } catch (e) {
    app.mic = null;
    mic.stop();
    showError(`Microphone unavailable: ${e.message || e.name}. You can still type.`);
  }
}

function stopMic() {
  if (app.mic) app.mic.stop();
  app.mic = null;
  ui.mic.setAttribute("aria-pressed", "false");
  ui.mic.textContent = "Mic off";
  setListening(false);
}

function onMicChunk(buffer) {
  if (!app.ready) return;
  if (app.mode === "ptt" && !app.pttHeld) return;
  if (!app.mic || app.mic.rate !== stats.inputRate) return;
  if (send("input_audio_buffer.append", { audio: int16ToBase64(buffer) })) {
    stats.audioChunksSent += 1;
    if (app.pttHeld) app.pttSentMs += (buffer.byteLength / 2) * 1000 / app.mic.rate;
  }
}

function setMode(mode) {
  app.mode = mode;
  ui.ptt.hidden = mode !== "ptt";
  if (app.ready) configureSession();
}

async function pttDown(e) {
  if (e) e.preventDefault();
  if (!app.ready || app.pttHeld) return;
  if (!app.mic) await startMic();
  interrupt(true);
  send("input_audio_buffer.clear");
  app.pttHeld = true;
  app.pttSentMs = 0;
  ui.ptt.classList.add("held");
  ui.ptt.textContent = "Listening… release to send";
  setListening(true);
}

function pttUp(e) {
  if (e) e.preventDefault();
  if (!app.pttHeld) return;
  app.pttHeld = false;
  ui.ptt.classList.remove("held");
  ui.ptt.textContent = "Hold to talk";
  setListening(false);
  if (app.pttSentMs >= MIN_PTT_MS) {
    send("input_audio_buffer.commit");
    send("response.create");
  } else {
    send("input_audio_buffer.clear");
    systemNote("Hold the button while you speak.");
  }
}

// ---- camera -------------------------------------------------------------------------------
async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("This page needs HTTPS (or localhost) to use the camera.");
    return;
  }
  try {
    app.camera.stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: app.camera.facing, width: { ideal: 640 }, height: { ideal: 480 } },
    });
  } catch (e) {
    showError(`Camera unavailable: ${e.message || e.name}`);
    return;
  }
  ui.preview.srcObject = app.camera.stream;
  ui.cameraBox.hidden = false;
  ui.camera.setAttribute("aria-pressed", "true");
  ui.camera.textContent = "Camera on";
  app.camera.timer = setInterval(sendFrame, FRAME_INTERVAL_MS);
}

function stopCamera() {
  clearInterval(app.camera.timer);
  app.camera.timer = null;
  if (app.camera.stream) app.camera.stream.getTracks().forEach((t) => t.stop());
  app.camera.stream = null;
  ui.preview.srcObject = null;
  ui.cameraBox.hidden = true;
  ui.camera.setAttribute("aria-pressed", "false");
  ui.camera.textContent = "Camera off";
}

function sendFrame() {
  const v = ui.preview;
  if (!app.ready || app.camera.busy || v.readyState < 2 || !v.videoWidth) return;
  const scale = Math.min(1, FRAME_MAX_SIDE / Math.max(v.videoWidth, v.videoHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(v.videoWidth * scale);
  canvas.height = Math.round(v.videoHeight * scale);
  canvas.getContext("2d").drawImage(v, 0, 0, canvas.width, canvas.height);
  app.camera.busy = true;
  canvas.toBlob((blob) => {
    if (!blob) { app.camera.busy = false; return; }
    const reader = new FileReader();
    reader.onload = () => {
      app.camera.busy = false;
      if (send("input_image_buffer.append", { image: reader.result })) {
        stats.framesSent += 1;
        stats.lastFrame = reader.result;
      }
    };
    reader.onerror = () => { app.camera.busy = false; };
    reader.readAsDataURL(blob);
  }, "image/jpeg", FRAME_QUALITY);
}

// ---- typed questions ----------------------------------------------------------------------
function sendText(ev) {
  ev.preventDefault();
  const text = ui.text.value.trim();
  if (!text || !app.ready) return;
  interrupt(true);
  send("conversation.item.create", { item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  send("response.create");
  ui.text.value = "";
}

// ---- wiring -------------------------------------------------------------------------------
ui.connect.addEventListener("click", connect);
ui.mic.addEventListener("click", () => (app.mic ? stopMic() : startMic()));
ui.camera.addEventListener("click", () => (app.camera.stream ? stopCamera() : startCamera()));
ui.flip.addEventListener("click", async () => {
  app.camera.facing = app.camera.facing === "user" ? "environment" : "user";
  stopCamera();
  await startCamera();
});
ui.stop.addEventListener("click", () => interrupt(true));
ui.form.addEventListener("submit", sendText);
for (const r of document.querySelectorAll('input[name="mode"]')) {
  r.addEventListener("change", () => setMode(r.value));
}
ui.ptt.addEventListener("pointerdown", pttDown);
for (const t of ["pointerup", "pointercancel", "pointerleave"]) ui.ptt.addEventListener(t, pttUp);
ui.ptt.addEventListener("contextmenu", (e) => e.preventDefault());   // long-press menu on phones
document.addEventListener("keydown", (e) => {
  if (e.code === "Space" && app.mode === "ptt" && e.target === document.body && !e.repeat) pttDown(e);
});
document.addEventListener("keyup", (e) => {
  if (e.code === "Space" && app.mode === "ptt" && e.target === document.body) pttUp(e);
});
setState("disconnected");
