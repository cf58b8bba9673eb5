"""`omni2 serve` as a user runs it: a subprocess on the tiny model, ready, one turn, clean stop."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import Client  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port: int, key: str | None = None):
    """/health/ready's status and body (its details need the metrics key on a keyed server)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/health/ready", headers=headers)
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None, None


@contextlib.contextmanager
def serving(*args: str, env: dict | None = None):
    """`omni2 serve ARGS` on a free port, ready (200) inside the block, then stopped by Ctrl-C,
    which must exit 0; `.out` holds its output after the block."""
    run = types.SimpleNamespace(port=free_port(), body=None, out="")
    proc = subprocess.Popen([sys.executable, "-m", "omni2.clients.cli", "serve", "--device", "cpu",
                             "--port", str(run.port), "--log-level", "warning", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        status = None
        while time.time() < deadline and proc.poll() is None:
            status, run.body = ready(run.port, (env or {}).get("OMNI2_METRICS_KEYS"))
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, (status, proc.poll())
        yield run
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            run.out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            run.out, _ = proc.communicate()
    assert proc.returncode == 0, run.out[-2000:]


def test_omni2_serve_tiny_comes_up_answers_and_stops():
    with serving("--model", "tiny", "--max-sessions", "2", "--max-steps", "24",
                 env={"OMNI2_API_KEYS": "k1", "OMNI2_METRICS_KEYS": "ops", "OMNI2_IDLE_TIMEOUT_S": "60"}) as run:
        body = run.body
        assert body["model"] == "tiny" and body["max_sessions"] == 2 and body["fallback"] is False

        async def turn():
            c = await Client.connect(f"ws://127.0.0.1:{run.port}/v1/realtime",
                                     headers={"Authorization": "Bearer k1"})
            assert (await c.recv())["type"] == "session.created"
            await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
            await c.send_text("hi")
            await c.send("response.create")
            events = await c.until("response.done", timeout=60)
            await c.close()
            return events

        events = asyncio.run(asyncio.wait_for(turn(), 90))
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
        assert any(e["type"] == "response.output_audio.delta" for e in events)


def test_omni2_serve_refuses_a_taken_port():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "omni2.clients.cli", "serve", "--model", "tiny",
                              "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot listen" in out.stderr


def test_omni2_serve_rejects_bad_settings():
    out = subprocess.run([sys.executable, "-m", "omni2.clients.cli", "serve", "--max-sessions", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "max_sessions must be >= 1" in out.stderr


def serve(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni2.clients.cli", "serve", "--port", str(free_port()),
                           "--device", "cpu", "--no-warmup", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("model", ["/nonexistent", "not/a/hub/id"])
def test_omni2_serve_exits_with_one_line_when_the_named_model_is_not_there(model):
    out = serve("--model", model)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith(f"omni2 serve: --model {model}: ") and "checkpoint" in lines[0]


def test_omni2_serve_stops_when_the_named_model_fails_to_load(tmp_path):
    """Every file is there (so the check before the server starts passes) but none loads: the
    failure on the loader thread stops the server instead of leaving /health/ready failed."""
    from omni2.model.checkpoint import REQUIRED_FILES

    for name in REQUIRED_FILES:
        (tmp_path / name).write_bytes(b"")
    out = serve("--model", str(tmp_path), "--log-level", "warning")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"omni2 serve: cannot serve --model {tmp_path}: CheckpointError: "), last
    assert "model_config.yaml" in last


def test_omni2_serve_auto_falls_back_to_tiny_and_tells_sessions():
    with serving("--model", "auto", "--no-warmup",
                 env={"OMNI2_CHECKPOINT": "/nonexistent", "HF_HUB_OFFLINE": "1"}) as run:
        assert run.body["fallback"] is True

        async def created():
            c = await Client.connect(f"ws://127.0.0.1:{run.port}/v1/realtime")
            event = await c.recv()
            await c.close()
            return event

        event = asyncio.run(asyncio.wait_for(created(), 30))
        assert event["type"] == "session.created" and event["session"]["model_fallback"] is True
    assert "serving the built-in TINY model" in run.out


def test_serve_help_names_every_compile_mode(capsys):
    from omni2.clients.cli import build_parser
    from omni2.server.serve import settings_from_args

    parser = build_parser(only="serve")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--compile {off,default,reduce-overhead}" in help_text and "{," not in help_text
    # off is the engine's "" (eager); the old empty spelling and OMNI2_COMPILE=off still work.
    for value, engine_mode in (("off", ""), ("", ""), ("OFF", ""), ("reduce-overhead", "reduce-overhead")):
        assert settings_from_args(parser.parse_args(["serve", "--compile", value])).compile == engine_mode
    from omni2.server.settings import SettingsError, settings_from_env

    assert settings_from_env({"OMNI2_COMPILE": "off"}).compile == ""
    assert settings_from_env({"OMNI2_COMPILE": "default"}).compile == "default"
    with pytest.raises(SettingsError, match="compile must be one of off, default, reduce-overhead"):
        settings_from_env({"OMNI2_COMPILE": "fast"})
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--compile", "fast"])


@pytest.mark.slow
def test_server_bench_smoke():
    from omni2.clients.tools.espeak import missing_tools

    if missing_tools():
        pytest.skip("the server bench speaks its questions with espeak-ng + sox")
    from omni2.clients.tools.bench_server import run_server_bench

    r = run_server_bench(sessions=2, rounds=1, max_steps=16, device="cpu", verbose=False)
    assert r["raw_frames_per_s"] > 0
    for way in ("speculation", "no_speculation"):
        assert r[way]["ws_frames_per_s"] > 0, way
        assert r[way]["first_audio_after_speech_stopped_s"]["p50"] is not None, way


def test_every_serve_option_reaches_the_settings():
    """Each `omni2 serve` flag lands in ServerSettings (--no-prepack, --no-speculation and
    --transcription-model were parsed and then dropped)."""
    import argparse

    from omni2.server.serve import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = settings_from_args(parser.parse_args([
        "--no-prepack", "--no-speculation", "--no-warmup", "--transcription-model", "/models/ct2",
        "--output-lead", "0.5", "--max-connections", "7", "--input-stall-timeout", "3", "--dtype", "fp32"]))
    assert (s.cpu_prepack, s.speculative_turns, s.warmup) == (False, False, False)
    assert (s.transcription_model, s.output_lead_s, s.max_connections) == ("/models/ct2", 0.5, 7)
    assert (s.input_stall_timeout_s, s.dtype) == (3.0, "fp32")
    # and every option's destination is a settings field
    fields = set(type(s).__dataclass_fields__)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests <= fields, dests - fields
