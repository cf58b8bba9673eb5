"""`omni2 chat` and `omni2 loadtest` against a real uvicorn server on loopback (tiny model).

The tiny model's words are noise, so answers are checked for shape: a valid 24 kHz WAV whose
length matches the audio the server sent, the printed transcript equal to the server's
final transcript, timings present, and the load tester counting every turn and refusal.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import socket
import threading
import time
import wave

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import jpeg_data_url, running_server, tiny_engine  # noqa: E402

from omni2.clients import chat, loadtest  # noqa: E402
from omni2.clients.cli import SUBCOMMANDS, build_parser  # noqa: E402
from omni2.clients.realtime_client import (  # noqa: E402
    Answer, RealtimeClient, RealtimeError, is_loopback, read_audio, realtime_url, wav_bytes)

MAX_STEPS = 40


@pytest.fixture(scope="module")
def engine():
    with tiny_engine(max_sessions=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, max_sessions=4, max_steps=MAX_STEPS) as srv:
        yield srv


@pytest.fixture()
def question_wav(tmp_path):
    path = tmp_path / "q.wav"
    path.write_bytes(wav_bytes(loadtest.default_question(16000, 1.0), rate=16000))
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(only=argv[0]).parse_args(argv)


def test_chat_spoken_question_with_image_writes_wav_and_prints_transcript(server, question_wav, tmp_path, capsys):
    out = tmp_path / "answer.wav"
    image = tmp_path / "pic.jpg"
    import base64
    image.write_bytes(base64.b64decode(jpeg_data_url().split(",", 1)[1]))
    args = parse(["chat", "--url", server.ws, "--audio", str(question_wav), "--image", str(image),
                  "--out", str(out), "--fast"])
    assert chat.main(args) == 0
    printed = capsys.readouterr()
    with wave.open(str(out), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        frames = w.getnframes()
    assert frames > 2400, "answer shorter than 0.1 s"
    assert "[completed]" in printed.err or "[incomplete: " in printed.err, printed.err
    assert "time to first audio" in printed.err and "no audio" not in printed.err
    assert f"{frames / 24000:.2f} s of audio" in printed.err
    assert printed.out.strip(), "no transcript printed"


def test_chat_transcript_equals_server_final_transcript(server):
    import asyncio

    async def go():
        client = await RealtimeClient.connect(server.ws)
        try:
            buf = io.StringIO()
            answer = await client.ask(text="hello there", pace=0.0, timeout=60.0, on_event=chat._printer(buf))
            return answer, buf.getvalue(), client.events
        finally:
            await client.close()

    answer, printed, events = asyncio.run(go())
    final = [e for e in events if e["type"] == "response.output_audio_transcript.done"][-1]["transcript"]
    assert printed == final == answer.transcript
    assert answer.status in ("completed", "incomplete")
    sent = sum(len(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert sent > 0 and answer.audio_s > 0 and answer.ttfa_s is not None and answer.ttfa_s >= 0


def test_chat_refused_by_wrong_key_and_bad_file(engine, question_wav, tmp_path, capsys):
    with running_server(engine, api_keys=("sekret",), max_steps=MAX_STEPS) as srv:
        bad = parse(["chat", "--url", srv.ws, "--text", "hi", "--api-key", "nope"])
        assert chat.main(bad) == 1
        assert "invalid_api_key" in capsys.readouterr().err
        good = parse(["chat", "--url", srv.ws, "--text", "hi", "--api-key", "sekret"])
        assert chat.main(good) == 0
    image_with_text = parse(["chat", "--url", "ws://127.0.0.1:9/v1/realtime", "--text", "hi",
                             "--image", str(question_wav)])
    assert chat.main(image_with_text) == 2
    assert "--image goes with a spoken question" in capsys.readouterr().err
    missing = parse(["chat", "--url", "ws://127.0.0.1:9/v1/realtime", "--audio", str(tmp_path / "none.wav")])
    assert chat.main(missing) == 2


def test_loadtest_three_sessions_one_turn(server, capsys):
    args = parse(["loadtest", "--url", server.ws, "--sessions", "3", "--turns", "1", "--fast",
                  "--duration-limit", "120"])
    assert loadtest.main(args) == 0
    table = capsys.readouterr().out
    assert _row(table, "turns completed") == "3", table
    assert _row(table, "turns failed") == "0" and _row(table, "errors") == "0", table
    assert _row(table, "refusals (1013)") == "0"
    assert _row(table, "time to first audio p50").endswith("ms") and not _row(table, "time to first audio p50").startswith("-")


def test_loadtest_counts_refusals_when_server_is_full(engine):
    import asyncio

    with running_server(engine, max_sessions=1, max_steps=8) as srv:
        args = parse(["loadtest", "--url", srv.ws, "--sessions", "3", "--turns", "1", "--fast"])
        report = asyncio.run(loadtest.run_load(args, loadtest.default_question(), 24000))
    s = report.summary()
    # The first session holds the only slot for its whole turn; the other two are refused.
    assert s["refusals"] == 2 and s["turns_completed"] == 1 and s["errors"] == 0, s


def test_loadtest_refuses_remote_hosts_and_bad_bounds():
    assert loadtest.main(parse(["loadtest", "--url", "ws://10.1.2.3:8000/v1/realtime"])) == 2
    assert loadtest.main(parse(["loadtest", "--sessions", "0"])) == 2
    assert loadtest.main(parse(["loadtest", "--turns", "1000"])) == 2
    assert is_loopback("ws://127.0.0.1:1/x") and is_loopback("ws://localhost/x") and is_loopback("ws://[::1]:8/")
    assert not is_loopback("wss://example.com/v1/realtime")


def test_connect_refusal_carries_code(engine):
    import asyncio

    with running_server(engine, max_sessions=1) as srv:
        async def go():
            first = await RealtimeClient.connect(srv.ws)
            try:
                with pytest.raises(RealtimeError) as info:
                    await RealtimeClient.connect(srv.ws)
                return info.value
            finally:
                await first.close()
        err = asyncio.run(go())
    assert err.refused and err.code == "server_busy" and err.close_code == 1013


def test_percentile_and_audio_round_trip(tmp_path):
    assert loadtest.percentile([], 50) is None
    assert loadtest.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert loadtest.percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 90) == 9.0
    x = np.sin(np.linspace(0, 100, 8000)).astype(np.float32) * 0.5
    path = tmp_path / "x.wav"
    path.write_bytes(wav_bytes(x, rate=8000))
    y, rate = read_audio(str(path))
    assert rate == 8000 and np.max(np.abs(y - x)) < 1e-4


def _row(table: str, name: str) -> str:
    for line in table.splitlines():
        if line.startswith(name):
            return line[len(name):].strip()
    raise AssertionError(f"no row {name!r} in\n{table}")


def test_loadtest_with_server_vad_times_from_speech_end(server, tmp_path):
    import asyncio

    from speech import missing_tools, utterance

    if missing_tools():
        pytest.skip("needs espeak-ng + sox for speech the server VAD can hear")
    audio, _, _ = utterance("what is on the table", lead_s=0.3, tail_s=1.0)
    args = parse(["loadtest", "--url", server.ws, "--sessions", "2", "--turns", "1", "--vad", "--fast"])
    report = asyncio.run(loadtest.run_load(args, audio, 16000))
    s = report.summary()
    assert s["turns_completed"] == 2 and s["errors"] == 0, (s, report.turns)
    # Sent as fast as possible, the whole file is out long before the server's VAD hears the
    # end of speech; time from speech_stopped to first audio is small but never negative.
    assert all(t.ttfa_s is not None and 0 <= t.ttfa_s < 30 for t in report.turns)


# ---- issue 13: a refused question, URLs, why an answer is incomplete, bench help ----------------
def test_chat_stops_at_the_error_that_refuses_the_question(server, tmp_path, capsys):
    short = tmp_path / "short.wav"   # 43 ms: too short to commit, so the question is refused
    short.write_bytes(wav_bytes(np.zeros(int(16000 * 0.043), np.float32), rate=16000))
    out = tmp_path / "answer.wav"
    args = parse(["chat", "--url", server.ws, "--audio", str(short), "--out", str(out), "--fast",
                  "--timeout", "60"])
    start = time.monotonic()
    assert chat.main(args) == 1
    assert time.monotonic() - start < 10, "waited for a response.done that never comes"
    err = capsys.readouterr().err
    assert "input_audio_buffer_commit_empty: Error committing" in err, err
    assert "refused the question (input_audio_buffer_commit_empty)" in err and "nothing written" in err, err
    assert not out.exists()


def test_realtime_url_accepts_what_users_type():
    assert realtime_url("ws://h:1/x?a=1") == "ws://h:1/x?a=1"
    assert realtime_url("ws://h:1") == realtime_url("ws://h:1/") == "ws://h:1/v1/realtime"
    assert realtime_url("http://h:8000") == "ws://h:8000/v1/realtime"
    assert realtime_url("https://h") == "wss://h/v1/realtime"
    assert realtime_url(" localhost:8000 ") == "ws://localhost:8000/v1/realtime"
    assert realtime_url("[::1]:8000/custom") == "ws://[::1]:8000/custom"
    for bad, why in [("ftp://h", "scheme"), ("http://", "no host"), ("ws://h:x", "Port"),
                     ("ws://h:70000", "Port"), ("ws://[::1", "IPv6")]:
        with pytest.raises(ValueError, match=why):
            realtime_url(bad)


def test_chat_and_loadtest_reach_the_server_by_http_or_bare_url(server, capsys):
    base = server.ws.removesuffix("/v1/realtime")
    for url in (server.http, base, base.removeprefix("ws://")):
        assert chat.main(parse(["chat", "--url", url, "--text", "hi", "--timeout", "60"])) == 0, url
    args = parse(["loadtest", "--url", server.http, "--sessions", "1", "--fast"])
    assert loadtest.main(args) == 0
    assert args.url == server.ws
    assert "Traceback" not in capsys.readouterr().err


@contextlib.contextmanager
def not_a_websocket_server():
    """A TCP port that hangs up on every connection, as a non-HTTP service might."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                sock.accept()[0].close()
            except OSError:
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        sock.close()


def test_unusable_urls_fail_in_one_line(server, capsys):
    def one_line(argv, status):
        module = chat if argv[0] == "chat" else loadtest
        assert module.main(parse(argv)) == status, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err and err.startswith(f"omni2 {argv[0]}: "), err
        return err

    assert "scheme must be" in one_line(["chat", "--url", "ftp://127.0.0.1:9", "--text", "hi"], 2)
    assert "Port" in one_line(["chat", "--url", "ws://127.0.0.1:x", "--text", "hi"], 2)
    assert "scheme must be" in one_line(["loadtest", "--url", "ftp://127.0.0.1:9"], 2)
    assert "HTTP 403" in one_line(["chat", "--url", server.ws + "x", "--text", "hi"], 1)
    with not_a_websocket_server() as hostport:
        assert "no WebSocket at" in one_line(["chat", "--url", hostport, "--text", "hi"], 1)


@pytest.fixture()
def capped_server():
    """The fake engine needs 16+ steps for its answer: a 4-step cap always cuts it short."""
    engine = FakeEngine(slots=2, tick_s=0.01).start()
    try:
        with running_server(engine, max_steps=4) as srv:
            yield srv
    finally:
        engine.stop()


def test_chat_says_why_an_answer_is_incomplete(capped_server, capsys):
    assert chat.main(parse(["chat", "--url", capped_server.ws, "--text", "hi", "--timeout", "30"])) == 0
    err = capsys.readouterr().err
    assert "[incomplete: the answer hit its length cap" in err, err
    assert chat.explain(Answer(status="incomplete")) == "the server gave no reason"
    assert chat.explain(Answer(status="cancelled", status_details={"reason": "turn_detected"})) == \
        "speech in the input interrupted it"
    assert chat.explain(Answer(status="completed")) is None



def test_chat_says_when_the_first_audio_time_is_unknown(monkeypatch, capsys):
    """Audio that began before the question's end (a later speech_stopped) has no time to first
    audio: the chat says "unknown", not "no audio"."""
    from omni2.clients.figures import answer_figures

    async def converse(args):
        return Answer(status="completed", done_at=3.0,
                      figures=answer_figures("completed", [(1.0, 2400)], asked_at=2.0, jitter_s=0.2, done_at=3.0))

    monkeypatch.setattr(chat, "converse", converse)
    assert chat.main(parse(["chat", "--text", "hi"])) == 0
    err = capsys.readouterr().err
    assert "time to first audio unknown; 0.10 s of audio in 1.00 s" in err, err


def test_bench_help_lists_every_benchmark_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        parse(["bench", "--help"])
    text = capsys.readouterr().out
    from omni2.clients.tools.bench import add_arguments

    own = argparse.ArgumentParser()
    add_arguments(own)
    bench = next(a for a in own._actions if isinstance(a, argparse._SubParsersAction))
    assert set(bench.choices) == {"model", "kernels", "engine", "arrivals", "server", "interrupt", "soak", "gateway"}
    lines = text.splitlines()
    for action in bench._choices_actions:
        assert action.dest in SUBCOMMANDS["bench"][1], f"{action.dest} missing from omni2's bench help"
        assert any(line.strip().endswith(action.help) for line in lines), f"{action.dest}: {action.help!r} wraps"
    assert SUBCOMMANDS["bench"][1] in text
