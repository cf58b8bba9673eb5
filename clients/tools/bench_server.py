"""`omni2 bench server`: what the WebSocket path costs on top of the engine.

Same engine, same spoken questions, same run: first straight into the engine (raw), then as
realtime clients streaming the speech at real time over loopback WebSockets through server
VAD. Reported: delivered speech frames per second both ways (target: the WebSocket path
keeps >= 90% of raw), and time to first audio after the end of speech, p50/p90, measured
from the true end of the voiced audio (includes the VAD's silence window) and from the
server's speech_stopped event. The WebSocket rounds run twice, against two servers on the
same engine: with speculation (question encoded and prefilled during the closing silence,
the default) and without (`--no-speculation`), so the latency it saves is measured in the
same run.
"""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from typing import Optional

import numpy as np

from omni2.clients.figures import percentile
from omni2.model.snac_layout import SAMPLE_RATE, SAMPLES_PER_FRAME

QUESTIONS = ["what can you see in front of you", "tell me about the weather today",
             "how far is it to the station", "what colour is the car over there",
             "can you read the sign for me", "how many people are in the room",
             "is it going to rain this afternoon", "what time does the shop close"]


def _questions(n: int, tail_s: float, turn_tail_ms: int):
    """Per session: (the turn the server VAD would cut, at 16 kHz; the whole stream at
    24 kHz; end of the voiced part in s). espeak-ng speech, 0.3 s lead, tail_s silence after."""
    from omni2.streaming.audio import resample
    from omni2.clients.tools.espeak import silence, speak

    out = []
    for i in range(n):
        voiced = speak(QUESTIONS[i % len(QUESTIONS)], speed=150 + 10 * (i % 4))
        audio = np.concatenate([silence(0.3), voiced, silence(tail_s)])
        end_s = 0.3 + voiced.size / 16000
        # The VAD turn: prefix padding (300 ms = the lead) through turn_audio_tail_ms of quiet.
        turn = audio[: int((end_s + turn_tail_ms / 1000) * 16000)]
        out.append((turn, resample(audio, 16000, SAMPLE_RATE), end_s))
    return out


def _open_session(engine, timeout_s: float = 30.0) -> str:
    """A closed session's slot is freed at the engine's next step: wait for it."""
    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            return engine.open_session()
        except Exception as exc:
            if type(exc).__name__ != "EngineFull" or time.perf_counter() > deadline:
                raise
            time.sleep(0.01)


def _wait_idle(engine, timeout_s: float = 30.0) -> None:
    """Sessions of the previous round release their slots at the next engine step."""
    deadline = time.perf_counter() + timeout_s
    while engine.stats()["sessions"] and time.perf_counter() < deadline:
        time.sleep(0.01)
    while engine.stats()["free_slots"] < len(engine.slots) and time.perf_counter() < deadline:
        time.sleep(0.01)


def _raw_round(engine, questions, max_steps: int) -> dict:
    """Submit each question when its speech would end (same stagger as the WebSocket round)."""
    from omni2.streaming.engine.messages import AudioChunk, TurnDone, TurnRequest

    sids = [_open_session(engine) for _ in questions]
    results: list = [None] * len(questions)
    first_end = min(q[2] for q in questions)
    t0 = time.perf_counter()

    def reader(i, turn, submitted):
        samples, first = 0, None
        for ev in turn.events(timeout=600):
            if isinstance(ev, AudioChunk):
                first = first or time.perf_counter()
                samples += ev.pcm.size
            elif isinstance(ev, TurnDone):
                results[i] = {"samples": samples, "ttfa": (first or time.perf_counter()) - submitted,
                              "end": time.perf_counter()}

    threads = []
    order = sorted(range(len(questions)), key=lambda i: questions[i][2])
    for i in order:
        a16, _, voiced_end = questions[i]
        delay = t0 + (voiced_end - first_end) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted = time.perf_counter()
        turn = engine.submit(TurnRequest(session_id=sids[i], audio_16k=a16, max_steps=max_steps))
        th = threading.Thread(target=reader, args=(i, turn, submitted), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    for sid in sids:
        engine.close_session(sid)
    wall = max(r["end"] for r in results) - t0
    frames = sum(r["samples"] for r in results) / SAMPLES_PER_FRAME
    return {"frames": frames, "wall": wall, "ttfa": [r["ttfa"] for r in results]}


async def _ws_session(url: str, audio_24k: np.ndarray, voiced_end_s: float, vad: bool = True,
                      chunk_s: float = 0.04) -> dict:
    """One realtime client streaming at real time. vad=False: the client commits and asks
    for the answer itself at the end of speech (isolates the server VAD's cost)."""
    import websockets

    n = int(SAMPLE_RATE * chunk_s)
    end_chunk = int(voiced_end_s / chunk_s) + 1
    async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
        json.loads(await ws.recv())  # session.created
        if not vad:
            await ws.send(json.dumps({"type": "session.update",
                                      "session": {"audio": {"input": {"turn_detection": None}}}}))
        got: dict = {"samples": 0}
        start = time.perf_counter()

        async def send():
            for k, i in enumerate(range(0, audio_24k.size, n)):
                # Real-time pacing from the session's own clock, so speech end is a known instant.
                delay = start + k * chunk_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                pcm = (np.clip(audio_24k[i:i + n], -1, 1) * 32767).astype("<i2").tobytes()
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm).decode()}))
                if not vad and k == end_chunk:
                    got["stopped"] = time.perf_counter()
                    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                    await ws.send(json.dumps({"type": "response.create"}))
                    return

        sender = asyncio.create_task(send())
        async for raw in ws:
            e = json.loads(raw)
            now = time.perf_counter()
            if e["type"] == "input_audio_buffer.speech_stopped":
                got["stopped"] = now
            elif e["type"] == "response.output_audio.delta":
                got.setdefault("first", now)
                got["samples"] += len(base64.b64decode(e["delta"])) // 2
            elif e["type"] == "response.done":
                got["end"] = now
                got["status"] = e["response"]["status"]
                break
            elif e["type"] == "error":
                raise RuntimeError(f"server error: {e['error']}")
        sender.cancel()
        got["voiced_end"] = start + voiced_end_s
        return got


def _client_round(url: str, audio_and_ends: list, vad: bool) -> list[dict]:
    """One round of realtime clients; runs in its own process so the clients' JSON and
    base64 work does not share the server's interpreter lock (perf_counter is
    CLOCK_MONOTONIC, comparable across processes)."""
    async def main():
        return await asyncio.gather(*(_ws_session(url, a24, end, vad) for a24, end in audio_and_ends))
    return asyncio.run(main())


def _serve_in_thread(app, settings):
    import uvicorn

    from omni2.server.serve import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


def _bench_runtime(model: str, device: str):
    """'tiny', a checkpoint directory, or 'real': every part at the released sizes with
    random weights (the real model's compute, for latency figures without its weights)."""
    from omni2.streaming.engine.runtime import load_runtime, pick_device, pick_dtype

    if model != "real":
        return load_runtime(model=model, device=device, prepack=True)
    from omni2.clients.tools.bench_engine import random_model
    from omni2.streaming.cpu.accelerate import accelerate_

    dev = pick_device(device)
    runtime = random_model("real", pick_dtype("auto", dev), str(dev))
    accelerate_(runtime.lm)
    return runtime


def run_server_bench(runtime_model: str = "tiny", sessions: int = 8, rounds: int = 3,
                     max_steps: int = 256, device: str = "auto", tail_s: float = 1.0,
                     vad: bool = True, verbose: bool = True, turns: Optional[int] = None) -> dict:
    """Raw engine vs WebSocket frames/s and first-audio latency, one engine, one run.

    rounds (alias turns): how many times every session asks its question, each way.
    """
    rounds = turns if turns is not None else rounds
    from omni2.streaming.engine.engine import Engine, EngineConfig

    from omni2.server.app import create_app
    from omni2.server.engine_host import EngineHost
    from omni2.server.settings import ServerSettings

    say = print if verbose else (lambda *a, **k: None)
    from omni2.streaming.cpu.threads import DEFAULT_THREADS, in_fresh_thread

    # loaded on a thread that ends, as `omni2 serve` does: see streaming/cpu/threads.py
    runtime = in_fresh_thread(_bench_runtime, runtime_model, device, threads=DEFAULT_THREADS)
    engine = Engine(runtime, EngineConfig(max_sessions=max(sessions, 1), max_steps=max_steps)).start()
    servers = []
    try:
        engine.warmup()
        # unpaced (output_lead_s=0): this measures what the socket path costs per frame; paced,
        # delivery is capped at playback speed by design
        settings = ServerSettings(max_sessions=sessions, max_steps=max_steps, log_level="warning",
                                  output_lead_s=0)
        questions = _questions(sessions, tail_s, settings.turn_audio_tail_ms)
        info = {"model": runtime.name, "device": str(runtime.device), "dtype": str(runtime.dtype)}
        urls = {}
        for name, speculate in (("speculation", True), ("no_speculation", False)):
            s = settings.replace(speculative_turns=speculate)
            server, thread, port = _serve_in_thread(create_app(s, EngineHost.ready_with(engine, info)), s)
            servers.append((server, thread))
            urls[name] = f"ws://127.0.0.1:{port}/v1/realtime"
        raw, ws_rounds = [], {name: [] for name in urls}
        import multiprocessing

        # Raw and WebSocket rounds alternate, so drift in machine load hits all alike.
        streams = [(a24, end) for _, a24, end in questions]
        with multiprocessing.get_context("spawn").Pool(1) as clients:
            for _ in range(rounds):
                _wait_idle(engine)
                raw.append(_raw_round(engine, questions, max_steps))
                for name, url in urls.items():
                    _wait_idle(engine)
                    ws_rounds[name].append(clients.apply(_client_round, (url, streams, vad)))
    finally:
        for server, thread in servers:
            server.should_exit = True
            thread.join(10)
        engine.stop()

    # Per-round rates, then the median: one noisy round does not decide the figure.
    raw_fps = float(np.median([r["frames"] / r["wall"] for r in raw]))
    raw_ttfa = [t for r in raw for t in r["ttfa"]]
    result = {
        "model": runtime.name, "device": str(runtime.device), "sessions": sessions, "rounds": rounds,
        "max_steps": max_steps, "raw_frames_per_s": raw_fps,
        "raw_first_audio_after_submit_s": _p50_p90(raw_ttfa),
        "vad_silence_ms": settings.vad_silence_ms, "turn_audio_tail_ms": settings.turn_audio_tail_ms,
    }
    for name, rounds_of in ws_rounds.items():
        ws_fps = float(np.median([
            sum(s["samples"] for s in rnd) / SAMPLES_PER_FRAME / (max(s["end"] for s in rnd) - min(s["stopped"] for s in rnd))
            for rnd in rounds_of]))
        result[name] = {
            "ws_frames_per_s": ws_fps, "ws_over_raw": ws_fps / raw_fps,
            "first_audio_after_speech_end_s": _p50_p90(
                [s["first"] - s["voiced_end"] for rnd in rounds_of for s in rnd if "first" in s]),
            "first_audio_after_speech_stopped_s": _p50_p90(
                [s["first"] - s["stopped"] for rnd in rounds_of for s in rnd if "first" in s]),
        }
    say(f"server bench: {runtime.name} on {runtime.device}, {sessions} sessions x {rounds} rounds, "
        f"max_steps {max_steps}")
    say(f"  raw engine: {raw_fps:8.1f} frames/s; first audio after submit "
        f"{_ms(result['raw_first_audio_after_submit_s'])}")
    for name in ws_rounds:
        r = result[name]
        say(f"  WebSocket, {name.replace('_', ' ')}: {r['ws_frames_per_s']:8.1f} frames/s "
            f"({100 * r['ws_over_raw']:.1f}% of raw; target >= 90%)")
        say(f"    first audio after speech end (incl. VAD silence) {_ms(r['first_audio_after_speech_end_s'])}")
        say(f"    first audio after speech_stopped                 {_ms(r['first_audio_after_speech_stopped_s'])}")
    return result


def _p50_p90(xs: list[float]) -> dict:
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90)}


def _ms(d: dict) -> str:
    if d["p50"] is None:
        return "p50 -   p90 -"
    return f"p50 {d['p50'] * 1000:7.1f} ms   p90 {d['p90'] * 1000:7.1f} ms"
