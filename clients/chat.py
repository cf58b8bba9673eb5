"""`omni2 chat`: ask a running server one question from the terminal.

The question is a sound file (`--audio q.wav`, streamed in real time like a microphone
would, or faster with `--fast`) or typed text (`--text`), optionally with a picture
(`--image`). The transcript is printed as it streams; the spoken answer goes to `--out`.
Exit status: 0 answered, 1 the server failed or refused, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Optional

from omni2.streaming.audio import REALTIME_SAMPLE_RATE

from .realtime_client import (Answer, RealtimeClient, RealtimeError, add_server_arguments, image_data_url,
                              read_audio, realtime_url, wav_bytes)

# response.done status_details.reason -> what it means to the person who asked
REASONS = {
    "max_output_tokens": "the answer hit its length cap (the server's max_steps or max_output_tokens)",
    "content_filter": "the server's content filter stopped it",
    "turn_detected": "speech in the input interrupted it",
    "client_cancelled": "the client cancelled it",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    q = parser.add_mutually_exclusive_group(required=True)
    q.add_argument("--audio", metavar="WAV", help="spoken question (any rate, mono or stereo)")
    q.add_argument("--text", help="typed question")
    parser.add_argument("--image", metavar="JPG", help="picture to ask about (JPEG or PNG)")
    parser.add_argument("--out", metavar="WAV", help="write the spoken answer here (24 kHz PCM16)")
    parser.add_argument("--vad", action="store_true",
                        help="let the server's voice activity detection end the question "
                             "(the file needs trailing silence) instead of committing it")
    parser.add_argument("--fast", action="store_true", help="send the audio as fast as possible")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")


def _printer(stream):
    def on_event(event: dict, answer: Answer) -> None:
        kind = event["type"]
        if kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            stream.write(event["delta"])
            stream.flush()
        elif kind == "input_audio_buffer.speech_started":
            print("[speech started]", file=sys.stderr)
        elif kind == "input_audio_buffer.speech_stopped":
            print("[speech stopped]", file=sys.stderr)
        elif kind == "error":
            err = event.get("error", {})
            print(f"\n[error] {err.get('code')}: {err.get('message')}", file=sys.stderr)
    return on_event


async def converse(args: argparse.Namespace, stream=None) -> Answer:
    if args.image and not args.audio:
        # Mini-Omni2's prompts pair a picture with speech only (see model/bundle.py).
        raise ValueError("--image goes with a spoken question (--audio): the model takes "
                         "pictures only together with speech")
    url = realtime_url(args.url)
    audio, rate = (read_audio(args.audio) if args.audio else (None, REALTIME_SAMPLE_RATE))
    image = image_data_url(args.image) if args.image else None
    client = await RealtimeClient.connect(url, api_key=args.api_key)
    try:
        if audio is not None:
            await client.configure(rate, vad=args.vad)
        return await client.ask(audio=audio, rate=rate, text=args.text, image_url=image, vad=args.vad,
                                pace=0.0 if args.fast else 1.0, timeout=args.timeout,
                                on_event=_printer(stream or sys.stdout))
    finally:
        await client.close()


def explain(answer: Answer) -> Optional[str]:
    """Why an answer stopped short, from response.done's status_details (None if it did not)."""
    if answer.status == "completed":
        return None
    details = answer.status_details or {}
    error = details.get("error") or {}
    reason = details.get("reason") or error.get("message") or error.get("code")
    return REASONS.get(reason, reason) if reason else "the server gave no reason"


def main(args: argparse.Namespace) -> int:
    try:
        answer = asyncio.run(converse(args))
    except (OSError, ValueError) as exc:
        print(f"omni2 chat: {exc}", file=sys.stderr)
        return 2
    except RealtimeError as exc:
        hint = " (server busy or loading: try again later)" if exc.refused else ""
        print(f"omni2 chat: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print()
    if answer.done_at is None:
        # No response.done: the server refused the question (its error is printed above)
        # or the answer never finished; either way there is nothing worth writing.
        why = (f"the server refused the question ({answer.refusal.get('code')})"
               if answer.refusal is not None else (answer.errors or ["no response.done"])[-1])
        print(f"omni2 chat: no answer: {why}" + ("; nothing written" if args.out else ""), file=sys.stderr)
        return 1
    if args.out:
        with open(args.out, "wb") as f:
            f.write(wav_bytes(answer.audio()))
    if answer.ttfa_s is not None:
        ttfa = f"{answer.ttfa_s * 1000:.0f} ms"
    else:   # no audio, or the question's end (a later speech_stopped) came after it began
        ttfa = "no audio" if answer.audio_s == 0 else "unknown"
    why = explain(answer)
    print(f"[{answer.status}{': ' + why if why else ''}] time to first audio {ttfa}; "
          f"{answer.audio_s:.2f} s of audio in {answer.wall_s:.2f} s"
          + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0 if answer.status in ("completed", "incomplete") else 1
