"""Streaming voice activity detection with silero-vad.

The model comes from the `silero-vad` wheel, which carries its TorchScript file, so it
works offline. silero-vad scores fixed 512-sample chunks at 16 kHz (32 ms) with a recurrent
state and a 64-sample context per stream. The scripted module would keep them inside itself
(one module per stream); here every SpeechDetector keeps its own `SileroStream` (state and
context) and one process-wide network scores them: `score_streams` runs the chunks of many
streams as one batch per 32 ms step (one call for every session a server process holds),
with the same per-stream results as the module's own forward (tests/test_vad_batch.py).

A SpeechDetector is a listening.detector.Detector: it scores its own audio with
`feed_input`, or in two halves around a batched call: `prepare_input` (audio -> whole
chunks), `score_streams`, `consume_input` (probabilities -> events).

Events follow the OpenAI Realtime server-VAD semantics the server exposes:
`speech_started.sample` is the onset minus `prefix_padding_ms` (the start of the audio a
turn would include), `speech_stopped.sample` is where `silence_ms` of quiet was reached
(the end of the audio a turn would include). Both are absolute 16 kHz sample indices
counted from construction or the last `reset()`.

With `pause_ms` set (below `silence_ms`), two more events let a server work ahead:
`speech_paused` when a quiet run inside speech reaches `pause_ms` (its sample is where the
quiet run reached that length: audio up to it is all a turn needs), and `speech_resumed`
when speech comes back before `speech_stopped`. A `speech_stopped` is always preceded by a
`speech_paused` of the same quiet run when pausing is on.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np

from ..audio import MODEL_SAMPLE_RATE as SAMPLE_RATE  # the rate silero scores (and whisper eats)
from .detector import Detector, Heard

# silero-vad v5+ accepts exactly this chunk size at 16 kHz.
CHUNK = 512


class VadModelError(RuntimeError):
    """silero-vad is missing or its model file cannot be loaded."""


def silero_model_path() -> str:
    """Path of the TorchScript model inside the installed silero-vad wheel.

    Found through the import spec rather than `import silero_vad`, because importing that
    package calls torch.set_num_threads(1) for the whole process, which would slow the
    engine sharing it.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadModelError("silero-vad is not installed: pip install silero-vad")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.jit")
    if not os.path.isfile(path):
        raise VadModelError(f"silero-vad is installed but its model file is missing: {path}")
    return path


def load_silero():
    """A fresh silero-vad TorchScript module (each carries its own recurrent state)."""
    import torch

    path = silero_model_path()
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 flags jit.load as deprecated; the wheel ships no other torch format
            # that keeps the recurrent state inside the module.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # a damaged wheel: say which file, not a TorchScript trace
        raise VadModelError(f"cannot load silero-vad model {path}: {exc}") from None
    model.eval()
    return model


class SileroStream:
    """One audio stream's silero-vad memory: recurrent state and the last 64 samples."""

    __slots__ = ("state", "context")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros((1, CONTEXT), dtype=np.float32)


CONTEXT = 64   # samples of the previous chunk silero-vad sees before each 16 kHz chunk


class _TorchNet:
    """The wheel's TorchScript network (its 16 kHz submodule, called with explicit state)."""

    name = "torchscript"
    sequence = None   # no unrolled export: every step is one batched call

    def __init__(self):
        self.model = load_silero()._model

    def __call__(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            out, new = self.model(torch.from_numpy(x), torch.from_numpy(state))
        return out.reshape(-1).numpy(), new.numpy()


class _OnnxNet:
    """The wheel's ONNX export on onnxruntime: ~10x less overhead per call than TorchScript
    for small batches (0.11 vs 1.06 ms for one chunk on the dev machine).

    The wheel also ships the same 16 kHz network unrolled over time for one stream
    (silero_vad_16k_sequence.onnx: k chunks with their contexts, the state as h and c): one
    call scores a stream's k chunks for about the cost of one call per chunk's compute alone
    (3 chunks: 0.20 vs 0.34 ms), with bit-identical probabilities and state. `sequence` is
    that call (None where the wheel lacks the file)."""

    name = "onnxruntime"

    def __init__(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1   # many small calls: threads cost more than they give
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        data = os.path.dirname(silero_model_path())
        self.session = ort.InferenceSession(os.path.join(data, "silero_vad.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self.sr = np.array(SAMPLE_RATE, dtype=np.int64)
        seq = os.path.join(data, "silero_vad_16k_sequence.onnx")
        self._seq = (ort.InferenceSession(seq, opts, providers=["CPUExecutionProvider"])
                     if os.path.isfile(seq) else None)
        if self._seq is None:
            self.sequence = None

    def __call__(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, new = self.session.run(None, {"input": x, "state": state, "sr": self.sr})
        return out.reshape(-1), new

    def sequence(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One stream's k chunks (k x 576, each with its 64-sample context) from `state`
        (2 x 1 x 128: h, c) -> (k probabilities, the state after the last)."""
        out, h, c = self._seq.run(None, {"input": x, "h": state[0:1], "c": state[1:2]})
        return out.reshape(-1), np.concatenate([h, c])


_nets: dict = {}
_loads = [0]   # networks loaded in this process: one per backend, whatever the session count


def networks_loaded() -> int:
    """How many silero networks this process has loaded (memory: each TorchScript one is ~7.5 MB
    of C heap, which a server that loaded one per session kept until a full gc; issue 19)."""
    return _loads[0]


def shared_silero(backend: str = "auto"):
    """The silero network shared by every stream of this process (stateless: each stream
    passes its own state). backend: "onnxruntime" when installed, else "torchscript"."""
    if backend == "auto":
        backend = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torchscript"
    net = _nets.get(backend)
    if net is None:
        net = _nets[backend] = _OnnxNet() if backend == "onnxruntime" else _TorchNet()
        _loads[0] += 1
    return net


# Up to this many streams in one call, each stream's chunks go through the sequence network
# in one call (one call per stream); beyond it, one batched call per 32 ms step is cheaper.
# Measured on the dev machine (onnxruntime 1.32, 3 chunks a stream, as a 100 ms append
# brings): per stream 0.20 ms either way at 4 streams, 0.20 vs 0.32 ms for one stream.
SEQUENCE_STREAMS_MAX = 3


def score_streams(streams: list[SileroStream], chunks: list[np.ndarray], backend: str = "auto") -> list[np.ndarray]:
    """Speech probabilities of `chunks[i]` (k_i x 512 float32) for `streams[i]`, in order.

    Step j scores the j-th chunk of every stream that has one, all in one batch, so a tick
    of many sessions costs a few network calls instead of one per chunk per session. A few
    streams (SEQUENCE_STREAMS_MAX) are scored one call each over their chunks instead, where
    the backend has the sequence network (same probabilities, fewer calls' overhead).
    """
    net = shared_silero(backend)
    if net.sequence is not None and len(streams) <= SEQUENCE_STREAMS_MAX:
        return [_score_sequence(net, st, c) for st, c in zip(streams, chunks)]
    probs = [np.zeros(c.shape[0], dtype=np.float32) for c in chunks]
    steps = max((c.shape[0] for c in chunks), default=0)
    for j in range(steps):
        rows = [i for i, c in enumerate(chunks) if c.shape[0] > j]
        x = np.empty((len(rows), CONTEXT + CHUNK), dtype=np.float32)
        for r, i in enumerate(rows):
            x[r, :CONTEXT] = streams[i].context[0]
            x[r, CONTEXT:] = chunks[i][j]
        state = np.concatenate([streams[i].state for i in rows], axis=1)
        out, state = net(x, state)
        for r, i in enumerate(rows):
            streams[i].state = np.ascontiguousarray(state[:, r : r + 1])
            streams[i].context = x[r : r + 1, -CONTEXT:].copy()
            probs[i][j] = out[r]
    return probs


def _score_sequence(net, stream: SileroStream, chunks: np.ndarray) -> np.ndarray:
    k = chunks.shape[0]
    if k == 0:
        return np.zeros(0, dtype=np.float32)
    flat = np.concatenate([stream.context[0], chunks.reshape(-1)])
    # row j: the 64 samples before chunk j, then chunk j (windows over the joined audio)
    x = np.lib.stride_tricks.sliding_window_view(flat, CONTEXT + CHUNK)[::CHUNK]
    out, stream.state = net.sequence(np.ascontiguousarray(x), stream.state)
    stream.context = flat[-CONTEXT:].reshape(1, CONTEXT).copy()
    return np.asarray(out, dtype=np.float32)


class SpeechDetector(Detector):
    """Turns a stream of 16 kHz float32 samples into speech start/stop events.

    threshold: speech probability at or above which a chunk counts as speech.
    silence_ms: quiet needed after speech before `speech_stopped`.
    prefix_padding_ms: audio before the detected onset that `speech_started.sample`
        includes (so a turn does not clip the first phoneme).
    min_speech_ms: speech needed before `speech_started` fires; shorter blips (clicks,
        breaths) are ignored. The reported sample is still the onset of the blip run.
    neg_threshold: probability below which a chunk counts as silence once in speech;
        between the two thresholds the state is kept (hysteresis against flicker).
    pause_ms: quiet after speech that reports `speech_paused` (None or >= silence_ms: off).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        silence_ms: int = 500,
        prefix_padding_ms: int = 300,
        min_speech_ms: int = 64,
        neg_threshold: float | None = None,
        pause_ms: int | None = None,
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1), got {threshold}")
        if silence_ms < 0 or prefix_padding_ms < 0 or min_speech_ms < 0:
            raise ValueError("VAD durations must be >= 0 ms")
        self.threshold = float(threshold)
        self.neg_threshold = (
            max(self.threshold - 0.15, 0.01) if neg_threshold is None else float(neg_threshold)
        )
        self.silence_samples = silence_ms * SAMPLE_RATE // 1000
        self.prefix_samples = prefix_padding_ms * SAMPLE_RATE // 1000
        self.min_speech_samples = min_speech_ms * SAMPLE_RATE // 1000
        self.pause_samples = None
        if pause_ms is not None and pause_ms < silence_ms:
            if pause_ms < 0:
                raise ValueError("VAD durations must be >= 0 ms")
            self.pause_samples = pause_ms * SAMPLE_RATE // 1000
        shared_silero()  # loaded now (a missing wheel fails here, not at the first audio)
        self._stream = SileroStream()
        self.reset()

    def reset(self) -> None:
        """Forget all audio: sample indices restart at 0, recurrent state cleared."""
        self._stream.reset()
        self._pending = np.zeros(0, dtype=np.float32)
        self.samples_seen = 0          # samples scored so far (multiple of CHUNK)
        self.speech_prob_last = 0.0
        self.in_speech = False
        self._onset: int | None = None  # first sample of a speech run not yet confirmed
        self._last_speech_end = 0       # end sample of the last chunk scored as speech
        self._last_stop = 0             # started.sample never reaches back before this
        self._quiet_from: int | None = None  # first sample of the current quiet run in speech
        self._paused = False            # speech_paused reported for the current quiet run

    @property
    def onset_pending(self) -> bool:
        """Speech chunks seen but not yet long enough for `speech_started`."""
        return self._onset is not None

    @property
    def last_speech_end(self) -> int:
        """End sample of the most recent chunk scored as speech (for end-of-speech timing)."""
        return self._last_speech_end

    @property
    def stream(self) -> SileroStream:
        return self._stream

    def feed_input(self, samples_16k: np.ndarray) -> list[Heard]:
        """Score the new audio and return the events it caused, in order.

        Any length is accepted; a tail shorter than one chunk waits for the next call.
        """
        chunks = self.prepare_input(samples_16k)
        if chunks.shape[0] == 0:
            return []
        return self.consume_input(chunks, score_streams([self.stream], [chunks])[0])

    def prepare_input(self, samples_16k: np.ndarray) -> np.ndarray:
        """The whole chunks (k x 512) the new audio completes; the tail waits for more."""
        x = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        if self._pending.size:
            x = np.concatenate([self._pending, x])
        n_full = (x.size // CHUNK) * CHUNK
        self._pending = x[n_full:].copy()
        return np.ascontiguousarray(x[:n_full]).reshape(-1, CHUNK)

    def consume_input(self, chunks, probs) -> list[Heard]:
        """Events caused by the next chunks, given their speech probabilities in order (the
        chunks themselves are not needed: the probabilities say it all)."""
        events: list[Heard] = []
        for prob in probs:
            start = self.samples_seen
            self.samples_seen += CHUNK
            self.speech_prob_last = float(prob)
            self._step(float(prob), start, events)
        return events

    def _step(self, prob: float, start: int, events: list[Heard]) -> None:
        end = start + CHUNK
        if not self.in_speech:
            if prob >= self.threshold:
                if self._onset is None:
                    self._onset = start
                self._last_speech_end = end
                if end - self._onset >= max(self.min_speech_samples, 1):
                    self.in_speech = True
                    begin = max(self._onset - self.prefix_samples, self._last_stop, 0)
                    events.append(Heard("speech_started", begin))
                    self._onset = None
            elif prob < self.neg_threshold:
                self._onset = None  # the run was a blip: drop it
            return
        if prob >= self.threshold:
            self._last_speech_end = end
            self._quiet_from = None
            if self._paused:
                self._paused = False
                events.append(Heard("speech_resumed", start))
            return
        if prob < self.neg_threshold and self._quiet_from is None:
            self._quiet_from = start
        # Chunks between the thresholds neither start nor cancel a quiet run (hysteresis),
        # so murmur after a word does not keep the turn open forever.
        if self._quiet_from is None:
            return
        if self.pause_samples is not None and not self._paused and end - self._quiet_from >= self.pause_samples:
            self._paused = True
            events.append(Heard("speech_paused", end))
        if end - self._quiet_from >= self.silence_samples:
            self.in_speech = False
            self._quiet_from = None
            self._paused = False
            self._last_stop = end
            events.append(Heard("speech_stopped", end))
