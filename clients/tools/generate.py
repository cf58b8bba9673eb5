"""`omni2 generate`: offline reference generation for one question, as JSON.

fp32, greedy, batch-parallel decoding (row 0 speaks, row 1 writes), the release's end rules.
The JSON shape is stable; scripts and the engine tests depend on it:
  {"prompt_ids": [row0, row1]  (each: 8 lists, audio layers 0-6 as local ids, then text ids),
   "text_tokens": [id per step], "audio_tokens": [[7 local ids] per step],
   "wav_samples": n, "text": "...", "stop": "eoa" | "max_steps"}
wav_samples: the samples written to --wav (0 without --wav: SNAC runs only then).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (released layout) or hub repo id")
    p.add_argument("--audio", help="spoken question (any format soundfile reads; resampled to 16 kHz)")
    p.add_argument("--image", help="optional image (JPEG/PNG) shown with the question")
    p.add_argument("--text", help="typed question instead of --audio")
    p.add_argument("--max-steps", type=int, default=512, help="cap on decode steps (85 ms of speech each)")
    p.add_argument("--snac", default=None, help="SNAC codec: hub repo id or local dir (default: <checkpoint>/snac, else hubertsiuzdak/snac_24khz)")
    p.add_argument("--wav", help="write the spoken answer here (24 kHz)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the full JSON (default: text summary)")


def main(args: argparse.Namespace) -> int:
    import soundfile as sf
    import torch

    from omni2.model.bundle import load_model
    from omni2.model.errors import CheckpointError
    from omni2.model.generate import generate
    from omni2.model.snac_codec import SNAC_REPO, decode_frames
    from omni2.model.snac_layout import SAMPLE_RATE, frames_from_steps, sanitize_frames
    from omni2.streaming.audio import load_audio_file, resample

    if not args.audio and not args.text:
        print("omni2 generate: give --audio (or --text)", file=sys.stderr)
        return 2
    try:
        model = load_model(args.checkpoint, snac=(args.snac or SNAC_REPO) if args.wav else None, device=args.device)
    except CheckpointError as exc:
        print(f"omni2 generate: {exc}", file=sys.stderr)
        return 1
    audio = None
    if args.audio:
        try:
            samples, rate = load_audio_file(args.audio)
        except (OSError, ValueError) as exc:
            print(f"omni2 generate: {args.audio}: {exc}", file=sys.stderr)
            return 1
        audio = resample(samples, rate, 16000)
    image = None
    if args.image:
        with open(args.image, "rb") as f:
            image = f.read()
    try:
        prompt, embeds = model.encode_question(audio, image=image, text=args.text)
    except ValueError as exc:
        print(f"omni2 generate: {exc}", file=sys.stderr)
        return 1
    gen = generate(model.lm, prompt, embeds, args.max_steps)
    n_samples = 0
    if args.wav:
        frames, _ = sanitize_frames(frames_from_steps(gen.audio_tokens))
        pcm = decode_frames(model.snac, frames)[0].cpu().numpy() if len(frames) else torch.zeros(0).numpy()
        sf.write(args.wav, pcm, SAMPLE_RATE)
        n_samples = int(pcm.shape[0])
    result = {
        "prompt_ids": prompt.to_lists(),
        "text_tokens": gen.text_tokens,
        "audio_tokens": gen.audio_tokens,
        "wav_samples": n_samples,
        "text": model.tokenizer.decode_answer(gen.text_tokens),
        "stop": gen.stop,
    }
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        wav = f"{n_samples} samples to {args.wav}" if args.wav else "none (no --wav)"
        print(f"{len(gen.text_tokens)} steps ({gen.stop}); text: {result['text']!r}; wav: {wav}")
    return 0
