"""Ephemeral client secrets over real HTTP and WebSocket (uvicorn on loopback): minted with an
API key (by the official SDK, parsed by its own models), accepted by the handshake in the
header and in the browser subprotocol, the secret's session applied, refused once expired."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from server_harness import Client, fake_engine_server
from test_server_session import run

KEY = "long-lived-key"


@pytest.fixture(scope="module")
def served():
    with fake_engine_server(settings={"api_keys": (KEY,)}) as pair:
        yield pair


def post(srv, body, key=KEY) -> tuple[int, dict]:
    request = urllib.request.Request(srv.http + "/v1/realtime/client_secrets", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_sdk_mints_a_secret_that_opens_sessions_with_its_configuration(served):
    from openai import AsyncOpenAI

    _, srv = served

    async def mint():
        client = AsyncOpenAI(api_key=KEY, base_url=srv.http + "/v1")
        secret = await client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 120},
            session={"type": "realtime", "output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}})
        await client.close()
        return secret

    secret = asyncio.run(mint())
    assert secret.value.startswith("ek_") and abs(secret.expires_at - time.time() - 120) < 5
    assert secret.session.type == "realtime" and secret.session.output_modalities == ["text"]

    async def open_with(**kw) -> dict:
        c = await Client.connect(srv.ws, **kw)
        created = await c.recv()
        await c.send_text("hello")
        await c.send("response.create")
        done = (await c.until("response.done"))[-1]
        await c.close()
        return created, done

    for kw in ({"headers": {"Authorization": f"Bearer {secret.value}"}},
               {"subprotocols": ["realtime", "openai-insecure-api-key." + secret.value]}):
        created, done = run(open_with(**kw))
        assert created["session"]["output_modalities"] == ["text"]
        assert created["session"]["audio"]["input"]["turn_detection"] is None
        assert done["response"]["status"] == "completed" and done["response"]["output_modalities"] == ["text"]


def test_minting_needs_the_api_key_and_a_valid_request(served):
    _, srv = served
    assert post(srv, {}, key=None)[0] == 401
    status, body = post(srv, {}, key="ek_not-a-key")
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")   # a secret cannot mint secrets
    status, body = post(srv, {"expires_after": {"anchor": "created_at", "seconds": 5}})
    assert (status, body["error"]["param"]) == (400, "expires_after.seconds")
    status, body = post(srv, {"session": {"type": "realtime", "audio": {"output": {"format": {"type": "audio/mp3"}}}}})
    assert (status, body["error"]["code"]) == (400, "invalid_value")
    status, body = post(srv, {})
    assert status == 200 and body["expires_at"] - time.time() > 590   # 600 s by default


def test_an_expired_or_unknown_secret_is_refused_at_the_handshake(served):
    from websockets.exceptions import InvalidStatus

    _, srv = served
    _, body = post(srv, {"expires_after": {"anchor": "created_at", "seconds": 10}})
    secrets = srv.app.state.client_secrets
    secrets.clock = lambda: time.time() + 11
    try:
        for value in (body["value"], "ek_never-minted"):
            with pytest.raises(InvalidStatus) as info:
                run(Client.connect(srv.ws, headers={"Authorization": f"Bearer {value}"}))
            assert info.value.response.status_code == 401
    finally:
        secrets.clock = time.time
