"""Secure defaults on a server with API keys: operator endpoints need their own key, browser
pages from other origins are refused, keys in URLs never reach the logs. (Answers cut by a
disconnect are counted: test_server_access.py, test_disconnect_mid_turn_frees_the_slot.)"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request

import pytest
import websockets

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import Client, running_server  # noqa: E402

from omni2.server.access import same_origin  # noqa: E402
from omni2.server.redact import redact_query  # noqa: E402

KEY = {"Authorization": "Bearer client-key"}
OPS = {"Authorization": "Bearer ops-key"}


@pytest.fixture(scope="module")
def engine():
    eng = FakeEngine(slots=4).start()
    yield eng
    eng.stop()


def get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def status_of(url: str, **kw):
    """HTTP status of a refused handshake, or 101 when the session opens."""
    try:
        async with websockets.connect(url, open_timeout=10, **kw) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            return 101
    except websockets.exceptions.InvalidStatus as exc:
        return exc.response.status_code


def test_operator_endpoints_need_their_own_key_on_a_keyed_server(engine):
    with running_server(engine, api_keys=("client-key",)) as srv:  # no metrics key set
        for headers in (None, KEY):
            status, body = get(srv.http + "/metrics", headers)
            assert status == 403 and json.loads(body)["error"]["code"] == "metrics_key_required"
            status, body = get(srv.http + "/health/ready", headers)
            assert (status, json.loads(body)) == (200, {"status": "ready"})  # probes still work
        assert get(srv.http + "/health")[0] == 200
    with running_server(engine, api_keys=("client-key",), metrics_keys=("ops-key",)) as srv:
        for headers in (None, KEY, {"Authorization": "Bearer ops-key-not"}):
            status, body = get(srv.http + "/metrics", headers)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_metrics_key"
        status, body = get(srv.http + "/metrics", OPS)
        assert status == 200 and "omni2_sessions_refused_total" in body
        status, body = get(srv.http + "/health/ready", OPS)
        assert status == 200 and {"model", "free_slots", "max_sessions"} <= set(json.loads(body))


def test_origins_are_checked_by_default_when_keys_are_set(engine):
    with running_server(engine, api_keys=("client-key",)) as srv:
        own = f"http://127.0.0.1:{srv.port}"

        async def main():
            assert await status_of(srv.ws, additional_headers=KEY, origin="https://evil.example") == 403
            assert await status_of(srv.ws, additional_headers=KEY, origin="null") == 403
            assert await status_of(srv.ws, additional_headers=KEY, origin=own) == 101  # its own page
            assert await status_of(srv.ws, additional_headers=KEY) == 101  # SDKs send no Origin

        run(main())
    with running_server(engine, api_keys=("client-key",), allowed_origins=("https://app.example",)) as srv:
        async def listed():
            assert await status_of(srv.ws, additional_headers=KEY, origin="https://app.example") == 101
            assert await status_of(srv.ws, additional_headers=KEY, origin="https://evil.example") == 403

        run(listed())
    with running_server(engine, api_keys=("client-key",), allowed_origins=("*",)) as srv:
        run(status_of(srv.ws, additional_headers=KEY, origin="https://any.example"))


def test_same_origin_reads_ports_and_schemes():
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert same_origin("https://omni.example", "omni.example:443")
    assert same_origin("http://[::1]:8000", "[::1]:8000")
    assert not same_origin("http://127.0.0.1:8001", "127.0.0.1:8000")
    assert same_origin("https://omni.example", "omni.example")  # behind a TLS proxy: the page's default port
    assert not same_origin("https://omni.example", "omni.example:80")
    assert not same_origin("http://evil.example", "omni.example")
    assert not same_origin("null", "omni.example")
    assert not same_origin("http://x:99999", "x")


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_keys_in_urls_are_redacted_from_the_logs(engine):
    assert redact_query("/v1/realtime?model=omni2&api_key=sekrit&x=1") == "/v1/realtime?model=omni2&api_key=***&x=***"
    captured = Captured()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn.access")]
    with running_server(engine, api_keys=("sekrit",), log_level="info") as srv:
        for lg in loggers:
            lg.addHandler(captured)
        try:
            async def main():
                c = await Client.connect(srv.ws + "?model=omni2&api_key=sekrit", headers={"Authorization": "Bearer sekrit"})
                assert (await c.recv())["type"] == "session.created"
                await c.close()

            run(main())
            get(srv.http + "/health?token=sekrit")
            time.sleep(0.2)
        finally:
            for lg in loggers:
                lg.removeHandler(captured)
    text = "\n".join(captured.lines)
    assert "/v1/realtime?model=omni2&api_key=***" in text and "/health?token=***" in text, text
    assert "sekrit" not in text
