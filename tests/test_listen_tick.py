"""The shared listening pass: many sessions' appends scored in one batch, same events.

Several sessions (plain VAD and duplex listeners) push espeak-ng speech and quiet in 100 ms
appends through one ListenTick, concurrently and at different offsets; every session must
get exactly the events it gets when pushed alone (InputAudio.push), while the tick runs
fewer passes than appends (the point of it).
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from omni2.server.input_audio import InputAudio, detector_factory_for  # noqa: E402
from omni2.server.listen_tick import ListenTick  # noqa: E402
from omni2.server.session_config import TurnDetection  # noqa: E402
from omni2.streaming.audio import AudioFormat, float_to_pcm16  # noqa: E402
from speech import requires_speech, silence, utterance  # noqa: E402


def sessions_audio() -> list[bytes]:
    out = []
    for i, text in enumerate(["what is the weather", "tell me a story", "how far is the station"]):
        x, _, _ = utterance(text, speed=150 + 20 * i, lead_s=0.3 + 0.4 * i, tail_s=1.0)
        out.append(float_to_pcm16(np.concatenate([x, silence(0.2 * i)])))
    return out


def make(mode: str) -> InputAudio:
    return InputAudio(AudioFormat("pcm16", 16000), TurnDetection(), max_turn_s=30, idle_keep_s=1.0,
                      detector_factory=detector_factory_for(mode))


def summary(events) -> list:
    return [(type(e).__name__, getattr(e, "sample", None), getattr(getattr(e, "audio", None), "size", None))
            for e in events]


@requires_speech
@pytest.mark.parametrize("quiet_ms", [None, 100])
def test_one_pass_for_many_sessions_gives_each_its_own_events(quiet_ms):
    """The same events with the slower quiet tick (100 ms while nobody speaks) as without it."""
    audio = sessions_audio()
    modes = ["vad", "vad", "barge_in", "vad", "barge_in", "vad"]
    datas = [audio[i % len(audio)] for i in range(len(modes))]
    step = 3200  # 100 ms of PCM16 at 16 kHz
    alone = []
    for mode, data in zip(modes, datas):
        a = make(mode)
        alone.append(summary([e for i in range(0, len(data), step) for e in a.push(data[i : i + step])]))

    async def together():
        tick = ListenTick(tick_ms=30, quiet_ms=quiet_ms)
        inputs = [make(mode) for mode in modes]

        async def one(k):
            await asyncio.sleep(0.013 * k)   # appends arrive at different phases
            events = []
            for i in range(0, len(datas[k]), step):
                events += await tick.push(inputs[k], datas[k][i : i + step])
                await asyncio.sleep(0.02)
            return summary(events)

        got = await asyncio.gather(*(one(k) for k in range(len(modes))))
        return got, tick

    got, tick = asyncio.run(together())
    assert got == alone
    assert all(any(e[0] == "SpeechStopped" for e in g) for g in got)
    assert tick.passes < tick.appends / 2, (tick.passes, tick.appends)


def test_quiet_sessions_share_fewer_passes_and_a_lively_one_cuts_the_wait():
    """While every session is quiet the passes are at least quiet_ms apart (a bound the tick
    keeps however loaded the host is); an append of a session with an answer under way ends
    a quiet wait at once."""
    quiet = [make("vad") for _ in range(4)]
    lively = make("vad")
    lively.note_speaking(True)
    assert lively.lively and not quiet[0].lively

    async def main():
        tick = ListenTick(tick_ms=10, quiet_ms=300)
        start = time.monotonic()

        async def one(a, k):
            await asyncio.sleep(0.007 * k)
            while time.monotonic() - start < 1.0:
                await tick.push(a, b"\0\0" * 1600)
                await asyncio.sleep(0.02)

        await asyncio.gather(*(one(a, k) for k, a in enumerate(quiet)))
        elapsed, passes = time.monotonic() - start, tick.passes
        assert passes <= elapsed / 0.3 + 2, (passes, elapsed)   # not the ~50 that 10 ms would allow
        await tick.push(quiet[0], b"\0\0" * 1600)                # the wait for the next pass: 300 ms
        waiting = asyncio.ensure_future(tick.push(quiet[1], b"\0\0" * 1600))
        await asyncio.sleep(0.02)
        t = time.monotonic()
        await tick.push(lively, b"\0\0" * 1600)
        assert time.monotonic() - t < 0.2 and waiting.done()   # cut to the 10 ms tick, in one pass

    asyncio.run(main())


def test_a_bad_append_fails_only_its_own_session():
    async def main():
        tick = ListenTick(tick_ms=20)
        good, bad = make("vad"), make("vad")
        results = await asyncio.gather(tick.push(good, b"\0\0" * 1600), tick.push(bad, b"\0\0\0"),
                                       return_exceptions=True)
        return results

    ok, err = asyncio.run(main())
    assert ok == [] and isinstance(err, ValueError)


def test_the_pass_thread_returns_results_and_errors_and_ends_when_idle():
    import threading

    from omni2.server.listen_tick import PassThread

    def work(x):
        if x is None:
            raise KeyError("bad")
        return (x * 2, threading.current_thread().name)

    runner = PassThread()
    runner.IDLE_S = 0.05

    async def main():
        loop = asyncio.get_running_loop()
        first = await runner.run(loop, work, 2)
        with pytest.raises(KeyError):
            await runner.run(loop, work, None)
        both = await asyncio.gather(runner.run(loop, work, 3), runner.run(loop, work, 4))
        assert runner.started == 1       # one thread served every call in a row
        for _ in range(100):             # idle past IDLE_S: the thread ends
            if not runner.alive:
                break
            await asyncio.sleep(0.02)
        assert not runner.alive
        again = await runner.run(loop, work, 5)
        return first, both, again

    first, both, again = asyncio.run(main())
    assert first == (4, "omni2-listen") and [b[0] for b in both] == [6, 8] and again[0] == 10
    assert runner.started == 2
