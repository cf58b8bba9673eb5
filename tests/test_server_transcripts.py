"""Transcripts on the wire hold no U+FFFD, even when the model writes bytes that are not UTF-8.

The tiny random-weight model answers noise with byte tokens such as 0xEB 0xEB 0xEB (lead bytes
that never get their continuation bytes); before the fix every transcript delta showed them
as U+FFFD. Here the real tiny engine answers through the real server, and the bytes it
decoded are recorded, so the test proves it met such bytes rather than getting lucky.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import Client, running_server, stream_audio, tiny_engine  # noqa: E402

from omni2.model.tokenizer import IncrementalDecoder  # noqa: E402

MAX_STEPS = 60


class RecordingTokenizer:
    """The engine's tokenizer, keeping the bytes of every token the live decoders read."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.bytes = bytearray()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def incremental(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def token_bytes(self, token_id: int) -> bytes:
        data = self._tokenizer.token_bytes(token_id)
        self.bytes += data
        return data


@pytest.fixture(scope="module")
def recorded():
    with tiny_engine(max_sessions=2) as engine:
        tok = RecordingTokenizer(engine.model.tokenizer)
        engine.model.tokenizer = tok
        with running_server(engine, max_steps=MAX_STEPS) as srv:
            yield srv, tok


async def _ask_with_noise(url: str, cancel_after_deltas: int = 0, seed: int = 0) -> list[dict]:
    """A spoken 'question' of white noise: the input that makes the tiny model write 0xEB runs.
    With cancel_after_deltas, the answer is cancelled after that many transcript deltas (if it
    ends first, its events are returned as they are)."""
    c = await Client.connect(url)
    try:
        assert (await c.recv())["type"] == "session.created"
        await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
        await c.until("session.updated")
        noise = np.random.default_rng(seed).standard_normal(24000 * 2).astype(np.float32) * 0.1
        await stream_audio(c, noise)
        await c.send("input_audio_buffer.commit")
        await c.send("response.create")
        if cancel_after_deltas:
            events = []
            while sum(e["type"] == "response.output_audio_transcript.delta" for e in events) < cancel_after_deltas:
                events.append(await c.recv())
                if events[-1]["type"] == "response.done":
                    return events
            await c.send("response.cancel")
            return events + await c.until("response.done", timeout=60)
        return await c.until("response.done", timeout=60)
    finally:
        await c.close()


def _check_transcript(events: list[dict]) -> str:
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    (done,) = [e["transcript"] for e in events if e["type"] == "response.output_audio_transcript.done"]
    final = events[-1]["response"]["output"][0]["content"][0]["transcript"]
    assert "\ufffd" not in deltas + done + final, done
    assert deltas == done == final
    return done


def test_transcript_of_invalid_utf8_bytes_has_no_replacement_characters(recorded):
    srv, tok = recorded
    tok.bytes.clear()
    events = asyncio.run(_ask_with_noise(srv.ws))
    assert events[-1]["response"]["status"] in ("completed", "incomplete")
    with pytest.raises(UnicodeDecodeError):  # the model did write bytes that are not UTF-8
        bytes(tok.bytes).decode("utf-8")
    _check_transcript(events)


def test_cancelled_transcript_is_the_deltas_sent_without_replacement_characters(recorded):
    srv, tok = recorded
    # Which noise makes the random tiny model write text at all depends on every input stage
    # (resampler included): take the first of a few that yields a delta before the answer ends.
    for seed in range(8):
        tok.bytes.clear()
        events = asyncio.run(_ask_with_noise(srv.ws, cancel_after_deltas=1, seed=seed))
        if events[-1]["response"]["status"] == "cancelled":
            break
    assert events[-1]["response"]["status"] == "cancelled", "no noise seed gave a transcript delta"
    assert _check_transcript(events)
