"""Test helper: synthesise speech and noise with espeak-ng + sox.

Tests that need real speech use `requires_speech` so they skip with a clear reason where
the tools are absent (CI installs them). The synthesis itself lives in
omni2.clients.tools.espeak, which the interrupt benchmark shares.
"""
from __future__ import annotations

import pytest

from omni2.clients.tools.espeak import (  # noqa: F401  (re-exported for tests)
    SAMPLE_RATE,
    missing_tools,
    mix,
    noise,
    resample,
    rms_db,
    set_level,
    silence,
    speak,
    trim_silence,
)

_absent = missing_tools()
requires_speech = pytest.mark.skipif(
    bool(_absent),
    reason=f"needs {', '.join(_absent)} on PATH to synthesise speech (apt-get install espeak-ng sox)",
)


def utterance(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50,
              lead_s: float = 0.5, tail_s: float = 1.0, level_db: float = -20.0):
    """`text` spoken with `lead_s` seconds of silence before and `tail_s` after.

    Returns (audio_16k, speech_start_sample, speech_end_sample).
    """
    voiced = speak(text, voice=voice, speed=speed, pitch=pitch, level_db=level_db)
    lead = silence(lead_s)
    audio = mix(mix(lead, voiced, lead.size), silence(tail_s), lead.size + voiced.size)
    return audio, lead.size, lead.size + voiced.size
