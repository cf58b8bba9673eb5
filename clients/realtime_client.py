"""A small asyncio client for the realtime protocol, shared by `omni2 chat` and `omni2 loadtest`.

It speaks only the wire protocol (JSON events over one WebSocket) and needs nothing but
`websockets` and numpy, so the terminal tools start in a fraction of a second and never
import torch. One `ask()` call is one turn: send the question (audio, text, image), then
collect the answer's transcript and PCM until `response.done`, or until an error event that
says no answer will come. Its timings (first audio, audio seconds, wall time, playback gaps)
are an `AnswerTracker`'s (clients/figures.py), fed every event as it arrives: the same
figures, by the same code, as the load tools report.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
import wave
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse, urlsplit, urlunsplit

import numpy as np

from omni2.streaming.audio import REALTIME_SAMPLE_RATE  # response.output_audio.delta is PCM16 at this rate

from .figures import JITTER_S, AnswerFigures, AnswerTracker, answer_figures

CLOSE_TRY_AGAIN = 1013            # server full or model not ready
CHUNK_S = 0.1                     # input audio per input_audio_buffer.append
CONNECT_TIMEOUT_S = 15.0
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
DEFAULT_PATH = "/v1/realtime"
DEFAULT_URL = f"ws://127.0.0.1:8000{DEFAULT_PATH}"
_WS_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


class RealtimeError(Exception):
    """The server answered with an error (or refused): `code` is the API error code."""

    def __init__(self, code: str, message: str, close_code: Optional[int] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.close_code = close_code

    @property
    def refused(self) -> bool:
        """Busy or not ready: the server asked to try again later (close 1013)."""
        return self.close_code == CLOSE_TRY_AGAIN or self.code in ("server_busy", "model_not_ready")


def realtime_url(url: str) -> str:
    """The WebSocket endpoint meant by what a user typed: ws(s):// as given, http(s):// as
    ws(s)://, a bare host[:port] as ws://, and the API's path when the URL names none (the
    server answers 403 anywhere else). ValueError, in one line, when it cannot be used."""
    text = url.strip()
    try:
        parts = urlsplit(text if "://" in text else "ws://" + text)
        parts.port                      # a port that is not a number 0..65535 raises here
    except ValueError as exc:
        raise ValueError(f"--url {url!r}: {exc}") from None
    scheme = _WS_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"--url {url!r}: the scheme must be ws, wss, http or https")
    if not parts.hostname:
        raise ValueError(f"--url {url!r}: no host name")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def add_server_arguments(parser) -> None:
    """--url and --api-key, the same for every tool that talks to a server."""
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"realtime endpoint: ws(s)://, http(s):// or host:port; the path "
                             f"defaults to {DEFAULT_PATH} (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("OMNI2_API_KEY"),
                        help="Bearer key if the server wants one (or OMNI2_API_KEY)")


def is_loopback(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


# ---- audio helpers (numpy only) ----------------------------------------------------------
def pcm16_bytes(x: np.ndarray) -> bytes:
    return (np.clip(np.asarray(x, np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """Mono float32 and its sample rate; WAV via the stdlib, other formats via soundfile."""
    try:
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2 or w.getcomptype() != "NONE":
                raise wave.Error("not 16-bit PCM")
            rate, channels = w.getframerate(), w.getnchannels()
            x = pcm16_to_float(w.readframes(w.getnframes()))
        return x.reshape(-1, channels).mean(axis=1), rate
    except (wave.Error, EOFError):
        pass
    try:
        import soundfile
    except ImportError:
        raise ValueError(f"{path}: only 16-bit PCM WAV can be read without soundfile") from None
    try:
        x, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: cannot read audio: {exc}") from None
    return x.mean(axis=1), int(rate)


def wav_bytes(x: np.ndarray, rate: int = REALTIME_SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16_bytes(x))
    return buf.getvalue()


def image_data_url(path: str) -> str:
    data = open(path, "rb").read()
    if data.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    else:
        raise ValueError(f"{path}: the server takes JPEG or PNG images")
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ---- pacing --------------------------------------------------------------------------------
class Pacer:
    """A fixed send schedule: send k is due at start + k * period_s. It sleeps to the schedule,
    not a period after each send, so the time sends take does not add up as drift."""

    def __init__(self, period_s: float, clock=time.monotonic):
        self.period_s, self.clock = period_s, clock
        self.start = clock()
        self.sent = 0

    async def sent_one(self) -> float:
        """Count a send just made and sleep until the next is due; returns how far past its due
        time that send was done (s)."""
        late = max(0.0, self.clock() - (self.start + self.sent * self.period_s))
        self.sent += 1
        delay = self.start + self.sent * self.period_s - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        return late


# ---- one answer --------------------------------------------------------------------------
@dataclass
class Answer:
    status: str = "none"                     # response.done status
    transcript: str = ""                     # final transcript (or the deltas if none came)
    pcm: bytearray = field(default_factory=bytearray)
    done_at: Optional[float] = None          # when response.done came (monotonic); None: it never did
    # first audio, audio seconds, wall time, gaps: the AnswerTracker's when the answer ended
    figures: AnswerFigures = field(default_factory=lambda: answer_figures("none", [], None, JITTER_S))
    errors: list[str] = field(default_factory=list)
    usage: Optional[dict] = None
    status_details: Optional[dict] = None    # response.done's reason for incomplete/cancelled
    refusal: Optional[dict] = None           # the error event's body that means no answer comes

    @property
    def audio_s(self) -> float:
        return self.figures.audio_s

    @property
    def ttfa_s(self) -> Optional[float]:
        """First audio after the question ended; None without audio, or when the question's
        end came after it (a later speech_stopped)."""
        return self.figures.ttfa_s

    @property
    def wall_s(self) -> Optional[float]:
        return self.figures.wall_s

    def audio(self) -> np.ndarray:
        return pcm16_to_float(bytes(self.pcm))


class RealtimeClient:
    """One session. `events` are every server event received, in order."""

    def __init__(self, conn):
        self.conn = conn
        self.events: list[dict] = []
        self.session: dict = {}

    @classmethod
    async def connect(cls, url: str, api_key: Optional[str] = None,
                      timeout: float = CONNECT_TIMEOUT_S) -> "RealtimeClient":
        """Open and wait for session.created; refusals raise RealtimeError."""
        import websockets
        from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            conn = await websockets.connect(url, additional_headers=headers, max_size=None,
                                            open_timeout=timeout)
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = _error_body(exc.response.body)
            hint = f" (is {urlparse(url).path} the realtime endpoint?)" if status in (403, 404) else ""
            raise RealtimeError(body.get("code") or f"http_{status}",
                                body.get("message") or f"HTTP {status} at the handshake{hint}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise RealtimeError("connect_failed", f"cannot reach {url}: {exc}") from None
        except WebSocketException as exc:   # a bad URI, or something that is not a WebSocket server
            raise RealtimeError("connect_failed", f"no WebSocket at {url}: {exc}") from None
        client = cls(conn)
        try:
            first = await client.recv(timeout)
        except ConnectionClosed as exc:
            raise RealtimeError("closed", f"closed before session.created ({exc})",
                                _close_code(exc)) from None
        if first["type"] == "error":
            err = first["error"]
            code = None
            try:
                await asyncio.wait_for(conn.wait_closed(), 2.0)
                code = conn.close_code
            except asyncio.TimeoutError:
                await conn.close()
            raise RealtimeError(err.get("code") or "error", err.get("message") or "", code)
        if first["type"] != "session.created":
            raise RealtimeError("protocol", f"expected session.created, got {first['type']}")
        client.session = first.get("session", {})
        return client

    async def send(self, type_: str, **fields) -> None:
        await self.conn.send(json.dumps({"type": type_, **fields}))

    async def recv(self, timeout: Optional[float] = None) -> dict:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        event = json.loads(raw)
        self.events.append(event)
        return event

    async def close(self) -> None:
        await self.conn.close()

    async def configure(self, input_rate: int, vad: bool) -> None:
        """Input format at the file's own rate (no resampling here); VAD on or off."""
        audio_in: dict = {"format": {"type": "audio/pcm", "rate": input_rate}}
        audio_in["turn_detection"] = {"type": "server_vad"} if vad else None
        await self.send("session.update", session={"type": "realtime", "audio": {"input": audio_in}})
        while (await self.recv(CONNECT_TIMEOUT_S))["type"] != "session.updated":
            pass

    async def send_audio(self, x: np.ndarray, rate: int, pace: float = 1.0) -> None:
        """Append audio in CHUNK_S pieces; pace 1.0 = real time, 0 = as fast as possible."""
        n = max(1, int(rate * CHUNK_S))
        pacer = Pacer(CHUNK_S * pace) if pace > 0 else None
        for i in range(0, x.size, n):
            chunk = base64.b64encode(pcm16_bytes(x[i:i + n])).decode()
            await self.send("input_audio_buffer.append", audio=chunk)
            if pacer is not None:
                await pacer.sent_one()

    async def ask(self, *, audio: Optional[np.ndarray] = None, rate: int = REALTIME_SAMPLE_RATE,
                  text: Optional[str] = None, image_url: Optional[str] = None, vad: bool = False,
                  pace: float = 1.0, timeout: float = 120.0, on_event=None, jitter_s: float = JITTER_S) -> Answer:
        """One turn. With `vad` the server cuts the turn (the audio needs trailing silence);
        otherwise the client commits and asks. `on_event(event, answer)` sees every event.
        The answer's playback gaps are counted behind a `jitter_s` buffer."""
        if image_url is not None:
            content = [{"type": "input_image", "image_url": image_url}]
            if text is not None and audio is None:
                content.append({"type": "input_text", "text": text})
                text = None
            await self.send("conversation.item.create",
                            item={"type": "message", "role": "user", "content": content})
        if text is not None:
            await self.send("conversation.item.create", item={
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
        answer = Answer()
        tracker = AnswerTracker(jitter_s, audio=answer.pcm)
        server_starts = vad and audio is not None
        # The server names our event_id in the error that refuses this response.create, or
        # the commit of our question (too short: response.create alone would answer from
        # the conversation without it).
        create_id = None if server_starts else f"evt_create_{time.monotonic_ns()}"
        commit_id = f"evt_commit_{time.monotonic_ns()}"
        # Listen while speaking: with VAD the answer can start before the file's tail is sent,
        # and event times must be taken when the events arrive.
        collector = asyncio.create_task(self.collect(answer, tracker, timeout, on_event, create_id, commit_id))
        try:
            if audio is not None:
                await self.send_audio(audio, rate, pace)
                if not vad:
                    await self.send("input_audio_buffer.commit", event_id=commit_id)
            if not server_starts:
                tracker.asked_at = time.monotonic()
                await self.send("response.create", event_id=create_id)
            elif tracker.asked_at is None:
                tracker.asked_at = time.monotonic()   # until the server's speech_stopped says
        except BaseException:
            collector.cancel()
            raise
        return await collector

    async def collect(self, answer: Answer, tracker: AnswerTracker, timeout: float, on_event=None,
                      create_id: Optional[str] = None, commit_id: Optional[str] = None) -> Answer:
        """Events until response.done, or until an error that refuses the answer before it
        starts: one naming `create_id` (our response.create) or `commit_id` (the commit of
        our spoken question), or, when the server starts the
        answer itself (VAD, `create_id` None), any error between speech_stopped and
        response.created. Then `answer.refusal` is that error and no response.done will come.
        Every event is fed to `tracker` (its `audio` is `answer.pcm`); `answer.figures` are its
        figures when the answer ends, however it ends."""
        from websockets.exceptions import ConnectionClosed

        deadline = time.monotonic() + timeout
        deltas: list[str] = []
        started = stopped = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    answer.errors.append(f"timeout: no response.done within {timeout:g} s")
                    return answer
                try:
                    event = await self.recv(left)
                except asyncio.TimeoutError:
                    continue
                except ConnectionClosed as exc:
                    answer.errors.append(f"connection closed ({_close_code(exc)})")
                    return answer
                now = time.monotonic()
                done = tracker.feed(event, now)   # VAD: the question ends at the server's speech_stopped
                kind = event["type"]
                if kind == "input_audio_buffer.speech_stopped":
                    stopped = True
                elif kind == "response.created":
                    started = True
                elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
                    deltas.append(event["delta"])
                elif kind in ("response.output_audio_transcript.done", "response.output_text.done"):
                    answer.transcript = event.get("transcript", event.get("text", ""))
                elif kind == "error":
                    err = event.get("error", {})
                    answer.errors.append(f"{err.get('code')}: {err.get('message')}")
                    ours = err.get("event_id") is not None and err.get("event_id") in (create_id, commit_id)
                    if not started and (ours if create_id else stopped):
                        answer.status, answer.refusal = "refused", err
                if on_event is not None:
                    on_event(event, answer)
                if answer.refusal is not None:
                    return answer
                if done is not None:
                    answer.done_at, answer.figures = now, done
                    resp = event.get("response", {})
                    answer.status = resp.get("status", "unknown")
                    answer.status_details = resp.get("status_details")
                    answer.usage = resp.get("usage")
                    answer.transcript = answer.transcript or "".join(deltas)
                    return answer
        finally:   # timed out, refused or closed: its figures so far
            if answer.done_at is None:
                answer.figures = tracker.figures(answer.status)


def _close_code(exc) -> Optional[int]:
    rcvd = getattr(exc, "rcvd", None)
    return getattr(rcvd, "code", None)


def _error_body(body: Optional[bytes]) -> dict:
    try:
        return json.loads(body or b"{}").get("error", {}) or {}
    except (ValueError, AttributeError):
        return {}
