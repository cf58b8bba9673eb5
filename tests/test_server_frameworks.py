"""Voice-agent frameworks that speak the OpenAI Realtime protocol drive omni2 unchanged.

- pipecat (`pipecat-ai[openai]`, in the dev extra): its `OpenAIRealtimeLLMService` in a
  pipeline, pointed at the server's ws:// URL; a spoken question ended by server VAD. pipecat
  validates every server event it knows against its own pydantic models and treats any
  `error` event as fatal, so a shape it refuses or an error ends the pipeline.
- LiveKit Agents (`livekit-agents[openai]`, not in the dev extra: ~40 packages with grpcio
  and the LiveKit native client; the test skips without it): its realtime session with manual
  turns (push audio, commit, generate_reply), reading the answer's audio and text streams.

Real uvicorn on loopback, null engine (its answer text names what the turn carried), espeak
speech and the real silero VAD; and each framework twice at once against the multi-process
server (`omni2 serve --model null --workers 2 --gateway-share 1`), whose supervisor accepts
every connection and hands it to a gateway: one session lands on each.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import fake_engine_server, installed, peak_connections, two_gateways  # noqa: E402,F401
from speech import requires_speech, resample, utterance  # noqa: E402


def question_pcm16() -> bytes:
    audio, _, _ = utterance("what is the weather like today", lead_s=0.4, tail_s=1.2)
    return (np.clip(resample(audio, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


async def pipecat_turn(url: str) -> list:
    """pipecat's realtime service in a pipeline asks one spoken question: every frame the
    pipeline carried past the service."""
    from pipecat.frames.frames import EndFrame, ErrorFrame, InputAudioRawFrame, LLMFullResponseEndFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

    seen: list = []

    class Sink(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            seen.append(frame)
            await self.push_frame(frame, direction)

    props = events.SessionProperties(audio=events.AudioConfiguration(input=events.AudioInput(
        turn_detection=events.TurnDetection(type="server_vad", silence_duration_ms=400))))
    llm = OpenAIRealtimeLLMService(api_key="unused", base_url=url,
                                   settings=OpenAIRealtimeLLMService.Settings(session_properties=props))
    task = PipelineTask(Pipeline([llm, Sink()]), params=PipelineParams(audio_in_sample_rate=24000,
                                                                       audio_out_sample_rate=24000))

    async def speak():
        await asyncio.sleep(1.0)   # the service connects and configures the session
        pcm = question_pcm16()
        for i in range(0, len(pcm), 1920):   # 40 ms frames, a bit faster than real time
            await task.queue_frame(InputAudioRawFrame(audio=pcm[i:i + 1920], sample_rate=24000, num_channels=1))
            await asyncio.sleep(0.02)
        for _ in range(300):
            if any(isinstance(f, (LLMFullResponseEndFrame, ErrorFrame)) for f in seen):
                break
            await asyncio.sleep(0.05)
        await task.queue_frame(EndFrame())

    await asyncio.gather(PipelineRunner(handle_sigint=False).run(task), speak())
    return seen


def check_pipecat_answer(seen: list) -> None:
    """No error frame, the answer ended, over half a second of its speech came through."""
    from pipecat.frames.frames import ErrorFrame, LLMFullResponseEndFrame, TTSAudioRawFrame

    assert [f for f in seen if isinstance(f, ErrorFrame)] == []
    assert any(isinstance(f, LLMFullResponseEndFrame) for f in seen), [type(f).__name__ for f in seen][-20:]
    audio = b"".join(f.audio for f in seen if isinstance(f, TTSAudioRawFrame))
    assert len(audio) > 24000 * 2 * 0.5


@requires_speech
def test_pipecat_realtime_service_gets_a_spoken_answer():
    pytest.importorskip("pipecat.services.openai.realtime", reason="pipecat-ai[openai] is not installed")
    with fake_engine_server(max_sessions=2) as (engine, srv):
        seen = asyncio.run(asyncio.wait_for(pipecat_turn(srv.ws), 60))
        submitted = list(engine.submitted)
    check_pipecat_answer(seen)
    assert len(submitted) == 1 and submitted[0].audio_16k.size > 16000   # the spoken question


@requires_speech
@pytest.mark.skipif(not installed("pipecat.services.openai.realtime"), reason="pipecat-ai[openai] is not installed")
def test_pipecat_on_both_gateways_of_the_multi_process_server(two_gateways):
    """Two pipelines at once against `--workers 2 --gateway-share 1`: one session on each gateway
    (handed its connection by the supervisor), each answered."""
    async def both(url: str):
        return await asyncio.gather(pipecat_turn(url), pipecat_turn(url))

    with peak_connections(two_gateways) as peak:
        runs = asyncio.run(asyncio.wait_for(both(two_gateways.ws), 60))
    assert peak == {1: 1, 2: 1}, peak
    for seen in runs:
        check_pipecat_answer(seen)


async def livekit_turn(http_url: str) -> tuple[int, str, list]:
    """LiveKit's realtime session, one manual turn (a second of tone, commit, generate_reply):
    (answer samples, answer text, error events)."""
    import aiohttp
    from livekit import rtc
    from livekit.plugins import openai as lk_openai

    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000) * 32767).astype("<i2")
    errors: list = []
    async with aiohttp.ClientSession() as http:
        model = lk_openai.realtime.RealtimeModel(base_url=http_url, api_key="unused", http_session=http,
                                                 turn_detection=None)
        session = model.session()
        session.on("error", errors.append)
        for i in range(0, tone.size, 480):
            frame = tone[i:i + 480]
            session.push_audio(rtc.AudioFrame(frame.tobytes(), 24000, 1, frame.size))
        session.commit_audio()
        generation = await asyncio.wait_for(session.generate_reply(), 15)
        samples, text = 0, ""
        async for message in generation.message_stream:
            async def audio():
                nonlocal samples
                async for f in message.audio_stream:
                    samples += f.samples_per_channel

            async def words():
                nonlocal text
                async for t in message.text_stream:
                    text += t
            await asyncio.gather(audio(), words())
        await session.aclose()
    return samples, text, errors


def test_livekit_realtime_session_manual_turn():
    pytest.importorskip("livekit.plugins.openai", reason="livekit-agents[openai] is not installed")
    with fake_engine_server(max_sessions=2) as (engine, srv):
        samples, text, errors = asyncio.run(asyncio.wait_for(livekit_turn(srv.http + "/v1"), 60))
    assert errors == []
    assert samples > 12000 and "1.0s-audio" in text, (samples, text)   # half a second of speech at least


@pytest.mark.skipif(not installed("livekit.plugins.openai"), reason="livekit-agents[openai] is not installed")
def test_livekit_on_both_gateways_of_the_multi_process_server(two_gateways):
    """Two LiveKit sessions at once against `--workers 2 --gateway-share 1`: one on each gateway."""

    async def both(url: str):
        return await asyncio.gather(livekit_turn(url), livekit_turn(url))

    with peak_connections(two_gateways) as peak:
        runs = asyncio.run(asyncio.wait_for(both(two_gateways.http + "/v1"), 60))
    assert peak == {1: 1, 2: 1}, peak
    for samples, text, errors in runs:
        assert errors == [] and samples > 12000 and "1.0s-audio" in text, (samples, text, errors)
