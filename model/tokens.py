"""Token spaces of Mini-Omni2: one text stream plus 7 audio streams (spec section 3).

Audio ids are handled as *local* ids (0..4159) everywhere outside the embedding; `to_global`
shifts them into the shared 181,120-row table only where the model needs it.
"""
from __future__ import annotations

N_AUDIO_LAYERS = 7
N_STREAMS = N_AUDIO_LAYERS + 1  # 7 audio layers, then text (index 7)
TEXT_STREAM = N_AUDIO_LAYERS

# Text stream: Qwen2 ids, then the specials Mini-Omni2 adds after the 151,936 tokenizer rows.
TEXT_VOCAB = 151_936
PADDED_TEXT_VOCAB = 152_000
EOT = TEXT_VOCAB
PAD_T = TEXT_VOCAB + 1
INPUT_T = TEXT_VOCAB + 2
ANSWER_T = TEXT_VOCAB + 3
ASR = TEXT_VOCAB + 4

# Each audio layer: SNAC codes 0..4095, then specials, padded to 4,160 rows.
SNAC_CODEBOOK = 4096
PADDED_AUDIO_VOCAB = 4160
EOA = SNAC_CODEBOOK
PAD_A = SNAC_CODEBOOK + 1
INPUT_A = SNAC_CODEBOOK + 2
ANSWER_A = SNAC_CODEBOOK + 3
SPLIT = SNAC_CODEBOOK + 4
IMAGE = SNAC_CODEBOOK + 5
EOIMAGE = SNAC_CODEBOOK + 6

TOTAL_VOCAB = PADDED_TEXT_VOCAB + N_AUDIO_LAYERS * PADDED_AUDIO_VOCAB  # 181,120


def to_global(local_id: int, layer: int) -> int:
    """Row of the embedding/head table for local audio id `local_id` of audio layer `layer`."""
    return PADDED_TEXT_VOCAB + PADDED_AUDIO_VOCAB * layer + local_id


def audio_slice(layer: int) -> slice:
    """Rows of the shared head that hold audio layer `layer`'s logits."""
    start = PADDED_TEXT_VOCAB + PADDED_AUDIO_VOCAB * layer
    return slice(start, start + PADDED_AUDIO_VOCAB)


TEXT_SLICE = slice(0, PADDED_TEXT_VOCAB)
