"""The browser client in real headless Chromium against a real server (tiny model, loopback).

Chromium's fake devices stand in for the user: the microphone plays an espeak-ng question
(looped, so the second repetition talks over the first answer: barge-in), the camera is
Chromium's animated test pattern. The page is driven with selenium through the system
chromedriver, and its counters (`window.omni2.stats`) and DOM are checked: voice turns by
server VAD and by push-to-talk, audio scheduled for playback, stop/barge-in flushing with
`conversation.item.truncate`, camera frames as valid JPEGs, and a phone-sized layout with no
horizontal overflow. Screenshots go to the test's tmp dir (and $OMNI2_SCREENSHOT_DIR if set).
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import RunningServer, tiny_engine  # noqa: E402
from speech import missing_tools, utterance  # noqa: E402

WEB_DIR = Path(__file__).resolve().parent.parent / "clients" / "web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
MAX_STEPS = 200        # tiny model: ~10 s of answer audio, so playback outlasts a barge-in
ASSETS = ["index.html", "app.js", "audio.js", "mic-worklet.js", "app.css"]

try:
    import selenium  # noqa: F401
    _selenium = True
except ImportError:
    _selenium = False

requires_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and _selenium),
    reason="needs chromium + chromium-driver (apt-get install chromium chromium-driver) and "
           "selenium (pip install selenium); .ci/run installs them")


@pytest.fixture(scope="module")
def engine():
    with tiny_engine(max_sessions=4) as eng:
        yield eng


def web_server(engine, fallback: bool = True, **overrides) -> RunningServer:
    from omni2.server.app import create_app
    from omni2.server.engine_host import EngineHost
    from omni2.server.settings import ServerSettings

    settings = ServerSettings(**{"log_level": "warning", "max_sessions": 2, "max_steps": MAX_STEPS,
                                 **overrides})
    host = EngineHost.ready_with(engine, {"model": "tiny", "device": "cpu", "dtype": "float32",
                                          "fallback": fallback})
    return RunningServer(create_app(settings, host, static_dir=WEB_DIR), settings).start()


@pytest.fixture(scope="module")
def server(engine):
    srv = web_server(engine)
    yield srv
    srv.stop()


# ---- without a browser ----------------------------------------------------------------------
def test_page_and_assets_are_served_and_self_contained(server):
    for name in ASSETS:
        path = "/" if name == "index.html" else "/" + name
        with urllib.request.urlopen(server.http + path, timeout=10) as r:
            assert r.status == 200, name
            body = r.read().decode()
            kind = r.headers["content-type"]
        assert body == (WEB_DIR / name).read_text(), name
        want = {"html": "text/html", "js": "javascript", "css": "text/css"}[name.rsplit(".", 1)[1]]
        assert want in kind, (name, kind)
        # No CDN, fonts or trackers: nothing but the server itself is ever contacted.
        assert not re.search(r"https?://(?!127\.0\.0\.1)", body), f"external URL in {name}"
    html = (WEB_DIR / "index.html").read_text()
    for name in ASSETS[1:]:
        if name != "audio.js" and name != "mic-worklet.js":
            assert f'"{name}"' in html, f"{name} not linked from index.html"
    js = (WEB_DIR / "app.js").read_text() + (WEB_DIR / "audio.js").read_text()
    for event in ("input_audio_buffer.append", "input_image_buffer.append", "conversation.item.truncate",
                  "response.cancel", "session.update", "openai-insecure-api-key."):
        assert event in js, event


def test_session_says_whether_the_fallback_model_answers(engine, server):
    """What the page reads to show its notice: session.created/updated's model_fallback."""
    import asyncio

    from server_harness import Client

    async def session_events(url):
        c = await Client.connect(url)
        created = await c.recv()
        await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
        updated = (await c.until("session.updated"))[-1]
        await c.close()
        return created, updated

    created, updated = asyncio.run(session_events(server.ws))
    assert created["type"] == "session.created"
    assert created["session"]["model_fallback"] is True and updated["session"]["model_fallback"] is True
    real = web_server(engine, fallback=False)
    try:
        created, updated = asyncio.run(session_events(real.ws))
    finally:
        real.stop()
    assert created["session"]["model_fallback"] is False and updated["session"]["model_fallback"] is False


# ---- in Chromium ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def question_wav(tmp_path_factory):
    if missing_tools():
        return None  # the fake device then plays its beep: fine for push-to-talk, not for VAD
    import soundfile

    audio, _, _ = utterance("what can you see in this picture", lead_s=0.5, tail_s=2.0)
    path = tmp_path_factory.mktemp("fake-mic") / "question.wav"
    soundfile.write(str(path), audio, 16000, subtype="PCM_16")
    return path


@pytest.fixture()
def browser(question_wav):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1280,800"):
        opts.add_argument(arg)
    if question_wav is not None:
        opts.add_argument(f"--use-file-for-fake-audio-capture={question_wav}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The system driver, never a downloaded one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def stats(driver) -> dict:
    return driver.execute_script("return window.omni2.stats")


def wait_for(driver, check, timeout=45.0, what="condition"):
    deadline = time.time() + timeout
    while True:
        s = stats(driver)
        if check(s):
            return s
        if time.time() > deadline:
            s["lastFrame"] = (s.get("lastFrame") or "")[:40]
            raise AssertionError(f"timed out waiting for {what}; stats: {s}")
        time.sleep(0.2)


def open_page(driver, server, mode="vad"):
    from selenium.webdriver.common.by import By

    driver.get(server.http + "/")
    assert driver.title.startswith("omni2")
    if mode == "ptt":
        driver.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="ptt"]').click()
    driver.find_element(By.ID, "connect").click()
    wait_for(driver, lambda s: s["events"].get("session.updated") and s["audioChunksSent"] > 0
             if mode == "vad" else s["events"].get("session.updated"), 20, "session ready + mic")
    assert driver.find_element(By.ID, "state").text == "connected"


def severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver, tmp_path, name) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    out = os.environ.get("OMNI2_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / name)
    assert path.stat().st_size > 10_000, "screenshot is suspiciously small"
    return path


def ask_push_to_talk(driver, hold_s=1.5):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ActionChains(driver).click_and_hold(driver.find_element(By.ID, "ptt")).pause(hold_s).release().perform()


def bubbles(driver, role):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f".bubble.{role}")


@requires_browser
def test_spoken_question_by_server_vad_then_barge_in(browser, server, question_wav, tmp_path):
    if question_wav is None:
        pytest.skip("needs espeak-ng + sox for a spoken question the server VAD can hear")
    open_page(browser, server)
    s = wait_for(browser, lambda s: s["events"].get("response.created") and s["audioDeltas"] > 0
                 and s["scheduledMs"] > 1000, 45, "an answer with audio")
    assert s["inputRate"] in (16000, 24000, 44100, 48000)
    assert s["events"]["input_audio_buffer.speech_started"] >= 1
    assert s["events"]["input_audio_buffer.committed"] >= 1
    assert bubbles(browser, "user"), "no user bubble"
    wait_for(browser, lambda s: s["events"].get("response.output_audio_transcript.done"), 30, "transcript done")
    assert any(b.text.strip() for b in bubbles(browser, "assistant")), "assistant bubble is empty"
    # The looped question starts again while ~10 s of answer still play: barge-in flushes the
    # queue and tells the server what was heard.
    s = wait_for(browser, lambda s: s["events"].get("conversation.item.truncated"), 30, "barge-in truncate")
    assert s["truncates"] >= 1 and s["events"]["input_audio_buffer.speech_started"] >= 2
    assert browser.execute_script("return window.omni2.app.player.playedMs()") <= s["scheduledMs"]
    assert "error" not in s["events"], s["errors"]
    assert s["statuses"] and "failed" not in s["statuses"], s["statuses"]
    screenshot(browser, tmp_path, "web-desktop-voice.png")
    assert severe_console_errors(browser) == []


@requires_browser
def test_push_to_talk_then_stop_flushes_playback(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server, mode="ptt")
    ptt = browser.find_element(By.ID, "ptt")
    assert ptt.is_displayed()
    time.sleep(0.5)
    assert stats(browser)["audioChunksSent"] == 0, "push-to-talk sent audio before the press"
    ask_push_to_talk(browser)
    s = wait_for(browser, lambda s: s["audioDeltas"] > 0 and s["scheduledMs"] > 2000, 45, "answer audio")
    assert 10 <= s["audioChunksSent"] <= 20, s["audioChunksSent"]   # ~1.5 s in 100 ms chunks
    assert s["events"]["input_audio_buffer.committed"] == 1
    assert "input_audio_buffer.speech_started" not in s["events"]     # VAD is off in this mode
    assert browser.execute_script("return window.omni2.app.player.sources.length") > 0
    browser.find_element(By.ID, "stop").click()
    s = wait_for(browser, lambda s: s["events"].get("conversation.item.truncated"), 10, "truncated")
    assert s["truncates"] == 1
    # Stop during generation cancels it (response.cancel); after it, only playback is cut.
    s = wait_for(browser, lambda s: s["statuses"], 10, "response.done")
    assert s["statuses"][0] in ("cancelled", "completed", "incomplete"), s["statuses"]
    assert (s["statuses"][0] == "cancelled") == (s["cancels"] == 1), s
    assert browser.execute_script("return window.omni2.app.player.sources.length") == 0
    assert browser.find_element(By.ID, "speaking-label").text == "silent"
    assert "error" not in s["events"], s["errors"]
    assert severe_console_errors(browser) == []


@requires_browser
def test_camera_sends_jpeg_frames_at_most_one_per_second(browser, server):
    from PIL import Image
    from selenium.webdriver.common.by import By

    open_page(browser, server, mode="ptt")
    browser.find_element(By.ID, "camera").click()
    t0 = time.time()
    s = wait_for(browser, lambda s: s["framesSent"] >= 3, 10, "three camera frames")
    elapsed = time.time() - t0
    assert elapsed >= 2.0, f"3 frames in {elapsed:.1f} s: faster than 1 fps"
    assert browser.find_element(By.ID, "preview").is_displayed()
    header, _, payload = s["lastFrame"].partition(",")
    assert header == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert img.format == "JPEG" and max(img.size) <= 512 and min(img.size) > 100
    # A spoken question is answered with the latest frame attached; no frame was refused.
    ask_push_to_talk(browser)
    s = wait_for(browser, lambda s: s["statuses"], 45, "answer")
    assert s["statuses"] == ["completed"] or s["statuses"] == ["incomplete"], s["statuses"]
    assert "error" not in s["events"], s["errors"]
    assert stats(browser)["framesSent"] >= 3
    browser.find_element(By.ID, "camera").click()
    assert not browser.find_element(By.ID, "preview").is_displayed()
    n = stats(browser)["framesSent"]
    time.sleep(1.5)
    assert stats(browser)["framesSent"] == n, "frames still sent after the camera was turned off"


@requires_browser
def test_phone_layout_has_no_horizontal_overflow_and_big_targets(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    open_page(browser, server, mode="ptt")
    browser.find_element(By.ID, "camera").click()
    wait_for(browser, lambda s: s["framesSent"] >= 1, 10, "a camera frame")
    ask_push_to_talk(browser)
    s = wait_for(browser, lambda s: s["statuses"] and s["scheduledMs"] > 0, 45, "answer")
    assert s["statuses"][0] in ("completed", "incomplete"), s["statuses"]
    scroll_w, client_w = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert client_w == 390 and scroll_w <= client_w, (scroll_w, client_w)
    notice = browser.find_element(By.ID, "fallback-notice")   # this server serves the tiny stand-in
    r = notice.rect
    assert notice.is_displayed() and r["x"] >= 0 and r["x"] + r["width"] <= 390 and r["y"] < 844, r
    for el in browser.find_elements(By.CSS_SELECTOR, "button"):
        if not el.is_displayed():
            continue
        r = el.rect
        assert r["x"] >= 0 and r["x"] + r["width"] <= 390 + 0.5, (el.text, r)
        assert r["height"] >= 40, f"touch target {el.text!r} is {r['height']} px tall"
    screenshot(browser, tmp_path, "web-phone-390x844.png")
    assert severe_console_errors(browser) == []


@requires_browser
def test_fallback_notice_shows_only_while_the_tiny_stand_in_answers(browser, server, engine, tmp_path):
    from selenium.webdriver.common.by import By

    notice = lambda: browser.find_element(By.ID, "fallback-notice")  # noqa: E731
    browser.get(server.http + "/")
    assert not notice().is_displayed(), "notice before the server said what it serves"
    open_page(browser, server, mode="ptt")
    assert notice().is_displayed() and "tiny" in notice().text and "noise" in notice().text
    r, width, height = notice().rect, *browser.execute_script("return [innerWidth, innerHeight]")
    assert r["x"] >= 0 and r["x"] + r["width"] <= width and r["y"] + r["height"] <= height / 2, r
    screenshot(browser, tmp_path, "web-desktop-fallback-notice.png")
    real = web_server(engine, fallback=False)
    try:
        open_page(browser, real, mode="ptt")
        assert not notice().is_displayed(), "notice on a server with a real checkpoint"
        # The same page connected to the stand-in again (the server address is a setting).
        browser.find_element(By.ID, "connect").click()
        browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
        url = browser.find_element(By.ID, "url")
        url.clear()
        url.send_keys(server.ws)
        browser.find_element(By.ID, "connect").click()
        wait_for(browser, lambda s: s["events"].get("session.created", 0) >= 2, 10, "second session")
        assert notice().is_displayed()
    finally:
        real.stop()
    assert severe_console_errors(browser) == []


@requires_browser
def test_typed_question_is_answered(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server, mode="ptt")
    browser.find_element(By.ID, "text").send_keys("what is the weather like")
    browser.find_element(By.ID, "send").click()
    s = wait_for(browser, lambda s: s["statuses"], 45, "answer")
    assert s["statuses"][0] in ("completed", "incomplete"), s["statuses"]
    assert any("what is the weather like" in b.text for b in bubbles(browser, "user"))
    assert any(b.text.strip() for b in bubbles(browser, "assistant"))
    assert "error" not in s["events"], s["errors"]


@requires_browser
def test_api_key_is_traded_for_a_client_secret_sent_as_subprotocol(browser, engine):
    from selenium.webdriver.common.by import By

    srv = web_server(engine, api_keys=("sekret-key",))
    try:
        browser.get(srv.http + "/")
        browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
        key = browser.find_element(By.ID, "key")
        key.send_keys("wrong")
        browser.find_element(By.ID, "connect").click()
        deadline = time.time() + 10
        while browser.find_element(By.ID, "state").get_attribute("data-state") != "error":
            assert time.time() < deadline, "a wrong key did not end in the error state"
            time.sleep(0.1)
        assert "session.created" not in stats(browser)["events"]
        assert browser.find_elements(By.CSS_SELECTOR, ".bubble.system"), "no note on the refused connection"
        key.clear()
        key.send_keys("sekret-key")
        browser.find_element(By.ID, "connect").click()
        wait_for(browser, lambda s: s["events"].get("session.updated"), 10, "session with the right key")
        assert browser.find_element(By.ID, "state").text == "connected"
        assert stats(browser)["clientSecret"], "the page sent the long-lived key, not a client secret"
    finally:
        srv.stop()


@requires_browser
def test_turns_the_model_forgot_are_marked(browser):
    """A 90-position context: the third typed turn pushes the first out of the model's window;
    the page marks that question and its answer from the server's context.truncated event."""
    from selenium.webdriver.common.by import By

    with tiny_engine(max_sessions=1, max_context=90) as eng:
        srv = web_server(eng, max_steps=24)
        try:
            open_page(browser, srv, mode="ptt")
            for n, words in enumerate(("hello there", "how are you", "tell me more"), start=1):
                browser.find_element(By.ID, "text").send_keys(words)
                browser.find_element(By.ID, "send").click()
                s = wait_for(browser, lambda s, n=n: len(s["statuses"]) >= n, 60, f"answer {n}")
                # heard to the end (a message sent over a playing answer truncates it: then the
                # model forgets the unheard rest, and the context would not fill)
                deadline = time.monotonic() + 30
                while browser.execute_script("return window.omni2.app.player.sources.length"):
                    assert time.monotonic() < deadline, "the answer never finished playing"
                    time.sleep(0.05)
            s = wait_for(browser, lambda s: True, 5, "stats")
            assert s["events"].get("conversation.context.truncated") == 1, s["events"]
            marked = [b for b in bubbles(browser, "user") + bubbles(browser, "assistant")
                      if "no longer in the model's memory" in b.text]
            assert len(marked) == 2 and "hello there" in marked[0].text, [b.text for b in marked]
        finally:
            srv.stop()
