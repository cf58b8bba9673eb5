"""One surface per role: every listening detector is a Detector emitting Heard events, the
server drives detectors and admissions only through their shared surface, and EngineBusy is
built the same way on both sides of the engine/gateway wire."""
from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

import numpy as np
import pytest

from omni2.streaming.listening import detector as det_mod
from omni2.streaming.listening.detector import Detector, Heard

ROOT = Path(__file__).resolve().parent.parent


def detector_classes():
    from omni2.streaming.listening import duplex, vad

    return [vad.SpeechDetector, duplex.DuplexController]


@pytest.mark.parametrize("cls", detector_classes(), ids=lambda c: c.__name__)
def test_every_detector_is_a_complete_detector(cls):
    assert issubclass(cls, Detector)
    assert not inspect.isabstract(cls), getattr(cls, "__abstractmethods__", None)
    # Every public method of the interface keeps its signature (a renamed argument or a
    # missing one breaks the server's calls, which are positional and keyword both).
    for name, member in vars(Detector).items():
        if name.startswith("_") or not callable(member):
            continue
        mine = getattr(cls, name)
        assert list(inspect.signature(mine).parameters) == list(inspect.signature(member).parameters), name


def test_an_incomplete_detector_cannot_be_made():
    class Half(Detector):
        def prepare_input(self, samples_16k):
            return np.zeros((0, 512), np.float32)

    with pytest.raises(TypeError):
        Half()


def test_the_plain_detector_leaves_the_answer_alone():
    pytest.importorskip("silero_vad")
    from omni2.streaming.listening.vad import SpeechDetector

    d = SpeechDetector()
    assert not d.decides_interrupts and not d.audible(0) and not d.may_decode()
    d.set_speaking(True)
    d.feed_output(np.ones(2400, np.float32))
    assert not d.audible() and d.feed_input(np.zeros(1600, np.float32)) == []


def test_the_duplex_controller_interrupts_with_a_heard_event():
    pytest.importorskip("silero_vad")
    from omni2.streaming.listening.duplex import DuplexConfig, DuplexController

    ctl = DuplexController(DuplexConfig(mode="barge_in", model_interrupt_token_ids=(7,)))
    assert ctl.decides_interrupts and ctl.stream is ctl.vad.stream
    ctl.set_speaking(True)
    ctl.feed_output(np.zeros(2400, np.float32))
    hit = ctl.on_model_tokens([7])
    assert isinstance(hit, Heard) and (hit.kind, hit.reason) == ("interrupt", "model")


def _probes(path: Path) -> list[str]:
    """The hasattr / getattr calls of one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_server_never_asks_a_detector_or_admission_what_it_is():
    """The modules that hold detectors, their events or an admission drive them through
    Detector / the admission surface only: no hasattr / getattr probing in them."""
    files = [ROOT / "server" / name for name in ("input_audio.py", "listen_tick.py", "app.py")]
    files += [ROOT / "streaming" / "listening" / name for name in ("detector.py", "vad.py")]
    # (app.py's one probe is of the engine, whether it has headroom figures: not these.)
    probes = [p for f in files for p in _probes(f) if "host.engine" not in p]
    assert probes == []


class Script(Detector):
    """Scores nothing; fires scripted events once the audio reaches them."""

    def __init__(self, events, decides=False, audible=False):
        self.events, self.seen, self.decides_interrupts, self._audible = list(events), 0, decides, audible
        self.calls: list[str] = []

    @property
    def stream(self):
        self.calls.append("stream")
        from omni2.streaming.listening.vad import SileroStream

        return SileroStream()

    def prepare_input(self, samples_16k):
        self.calls.append("prepare_input")
        self.seen += samples_16k.size
        return np.zeros((0, 512), np.float32)

    def consume_input(self, chunks, probs):
        self.calls.append("consume_input")
        due = [e for e in self.events if e.sample <= self.seen]
        self.events = [e for e in self.events if e.sample > self.seen]
        return due

    def feed_input(self, samples_16k):
        return self.consume_input(self.prepare_input(samples_16k), [])

    def audible(self, at=None):
        return self._audible

    def may_decode(self):
        self.calls.append("may_decode")
        return False

    def set_speaking(self, speaking):
        self.calls.append(f"set_speaking:{speaking}")

    def feed_output(self, pcm_24k):
        self.calls.append(f"feed_output:{pcm_24k.size}")


def _drive(script: "Script", decides: bool) -> list:
    """Ten 0.1 s appends through the listening pass the server runs every tick."""
    from omni2.server.input_audio import InputAudio
    from omni2.server.listen_tick import listen_pass
    from omni2.server.session_config import TurnDetection
    from omni2.streaming.audio import AudioFormat

    audio = InputAudio(AudioFormat("pcm16", 16000), TurnDetection(), 10.0, 1.0, lambda td: script)
    assert audio.listener is decides
    audio.note_speaking(True)
    audio.note_output(np.zeros(480, np.float32))
    events = []
    for _ in range(10):
        events += listen_pass([(audio, np.zeros(1600, "<i2").tobytes())])[0]
    assert not audio.may_decode and script.calls[-1] == "may_decode"
    return events


def test_the_server_holds_speech_for_a_detector_that_decides_interrupts():
    from omni2.server.input_audio import Interrupted

    script = Script([Heard("speech_started", 1600), Heard("interrupt", 3200, "command", "stop omni"),
                     Heard("speech_stopped", 8000)], decides=True, audible=True)
    events = _drive(script, True)
    # Speech while the answer is audible is held; the command is no turn.
    assert [type(e) for e in events] == [Interrupted]
    assert (events[0].kind, events[0].phrase, events[0].sample) == ("command", "stop omni", 3200)
    # The answer's start and its audio reached the detector, before the microphone's audio.
    assert script.calls[:3] == ["set_speaking:True", "feed_output:480", "prepare_input"]


def test_the_server_turns_a_plain_detectors_speech_into_a_turn():
    from omni2.server.input_audio import SpeechStarted, SpeechStopped

    script = Script([Heard("speech_started", 1600), Heard("speech_stopped", 8000)], decides=False, audible=True)
    events = _drive(script, False)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    assert events[1].audio.size == 8000 - 1600
    # A detector that does not decide interrupts is not told about the answer.
    assert not any(c.startswith(("set_speaking", "feed_output")) for c in script.calls)


def test_both_admissions_offer_the_same_surface():
    from omni2.server.access import Admission
    from omni2.server.workers.remote_engine import RemoteAdmission

    surface = {"enter", "leave", "refresh", "workers", "limit", "active"}
    for cls in (Admission, RemoteAdmission):
        names = set(dir(cls)) | set(inspect.signature(cls.__init__).parameters)
        missing = surface - names - ({"active"} if cls is Admission else set())
        assert not missing, (cls.__name__, missing)
    local = Admission(3)
    asyncio.run(local.refresh())
    assert local.workers() is None and local.active == 0 and local.limit == 3


def test_engine_busy_is_built_alike_on_both_sides_of_the_wire():
    from types import SimpleNamespace

    from omni2.server.workers import wire
    from omni2.streaming.engine.messages import EngineBusy, EngineFull

    decision = SimpleNamespace(reason=lambda: "no headroom", retry_after_s=0.75)
    here = EngineBusy.refused(decision)
    assert here.decision is decision and here.retry_after_s == 0.75 and str(here) == "no headroom"
    there = wire.error_from_wire(wire.unpack(wire.pack(wire.error_to_wire(here))))
    assert type(there) is EngineBusy and isinstance(there, EngineFull)
    assert (str(there), there.retry_after_s, there.decision) == ("no headroom", 0.75, None)
    again = wire.error_from_wire(wire.error_to_wire(there))  # a gateway's passes on unchanged
    assert (type(again), str(again), again.retry_after_s) == (EngineBusy, "no headroom", 0.75)
    assert EngineBusy("full up").retry_after_s is None


def test_the_detector_module_imports_no_detector():
    """detector.py is below vad.py and duplex.py (they subclass it): it imports neither."""
    tree = ast.parse(Path(det_mod.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"vad", "duplex", "interrupt", "echo"}


# ---- one home for the output rate ---------------------------------------------------------------
def test_the_realtime_rate_is_the_codec_rate():
    """The server plays the model's audio as Realtime PCM without resampling."""
    from omni2.model.snac_layout import SAMPLE_RATE
    from omni2.streaming.audio import REALTIME_SAMPLE_RATE

    assert SAMPLE_RATE == REALTIME_SAMPLE_RATE


def test_the_clients_import_the_rate_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"   # any `import torch` now fails
            "import omni2.clients.chat, omni2.clients.loadtest, omni2.clients.live_load, omni2.clients.figures\n"
            "from omni2.clients import realtime_client\n"
            "from omni2.streaming.audio import REALTIME_SAMPLE_RATE\n"
            "assert realtime_client.wav_bytes.__defaults__ == (REALTIME_SAMPLE_RATE,)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_module_outside_model_writes_the_rate_as_a_number():
    """24000 as a number appears once outside model/: REALTIME_SAMPLE_RATE's definition."""
    found = []
    for folder in ("streaming", "server", "clients"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 24000:
                    found.append(str(path.relative_to(ROOT)))
    assert found == ["streaming/audio.py"]


# ---- one percentile ---------------------------------------------------------------------------
def test_the_percentile_is_nearest_rank():
    from omni2.clients.figures import percentile

    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 40, 101):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 90, 95, 99, 100):
            assert percentile(xs, q) == np.percentile(xs, q, method="inverted_cdf"), (n, q)
    assert percentile(list(range(1, 41)), 99) == 40   # a few dozen values: p99 is the slowest
    assert percentile([], 50) is None and percentile(np.array([]), 50) is None


def test_clients_compute_percentiles_one_way():
    """No module of clients/ (or server/) computes a percentile of its own."""
    found = []
    for folder in ("clients", "server"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr in ("percentile", "quantile", "nanpercentile"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.FunctionDef) and "percentile" in node.name and path.name != "figures.py":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: def {node.name}")
    assert found == []
