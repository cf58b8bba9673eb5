"""The Qwen2 text tokenizer of a checkpoint, plus streaming decode for live transcripts.

The released checkpoint ships the Hugging Face `tokenizer.json` of Qwen2 (byte-level BPE, no
BOS). Mini-Omni2 puts its own text specials (`eot`, `pad_t`, ...) right after the tokenizer's
151,936 rows, so a decoder must expect ids the tokenizer has never heard of: they are skipped,
never an error (a tiny random model emits anything in [0, 152000)).

Byte-level BPE can split one character over several tokens (an emoji is 4 bytes, a token may
hold only some of them), so `IncrementalDecoder` keeps a byte buffer and emits text only once
the bytes form complete UTF-8 characters. A model may also emit bytes that never form a
character (a lone continuation byte, a lead byte followed by another lead byte: the tiny
random-weight model does so all the time, and a real turn cut off by max_steps can end inside
a character). Those bytes are dropped, not shown as U+FFFD: the text is a user-facing
transcript, and `decode` drops them the same way, so streamed deltas still add up to it.

`write_tiny_tokenizer` writes a small tokenizer in the same file format, learned
deterministically from a built-in text, so the synthetic tiny checkpoint has the released
file layout without any download.
"""
from __future__ import annotations

import codecs
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from . import tokens
from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
# Bytes that can never be part of a UTF-8 character are dropped from the text (module doc).
UTF8_ERRORS = "ignore"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Qwen2's pre-tokenizer split (a fact of the released tokenizer.json, needed to write one in
# the same format): contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_to_char() -> list[str]:
    """The byte-level alphabet: every byte gets a printable stand-in character.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) are moved to
    code points 256+ in byte order, so that a BPE vocab never holds whitespace or controls.
    """
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = [""] * 256
    shifted = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def _alphabet_order() -> list[str]:
    """Byte tokens in the order GPT-2-style vocabularies list them: kept bytes first."""
    kept = [BYTE_TO_CHAR[b] for b in range(256) if ord(BYTE_TO_CHAR[b]) == b]
    moved = [BYTE_TO_CHAR[b] for b in range(256) if ord(BYTE_TO_CHAR[b]) != b]
    return kept + moved


class TextTokenizer:
    """Encode/decode Qwen2 text; ids outside the vocabulary decode to nothing."""

    def __init__(self, tokenizer, path: Path | None = None, config: dict | None = None):
        self._tok = tokenizer
        self.path = path
        self.config = config or {}
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Added specials (<|im_end|> ...) are control tokens, not transcript text.
        self._special_ids = {
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        # Built now (~0.2 s for Qwen2's 151k tokens) so that no session's first transcript
        # delta pays for it inside the streaming loop.
        self._id_bytes = self._build_byte_table()

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer  # imported here: model/ stays importable without it

        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found (the checkpoint must ship {TOKENIZER_FILE})")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception for any parse error
            raise CheckpointError(f"{path}: not a valid Hugging Face tokenizer file: {exc}") from exc
        config: dict = {}
        cfg_path = directory / TOKENIZER_CONFIG_FILE
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{cfg_path}: not valid JSON: {exc}") from exc
            if not isinstance(config, dict):
                raise CheckpointError(f"{cfg_path}: expected a JSON object")
        return cls(tok, path, config)

    # ---- encode / decode ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        # Qwen2 adds no BOS/EOS; add_special_tokens=False keeps it that way for any post-processor.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; specials, ids the tokenizer lacks and bytes that are not UTF-8
        contribute nothing (the byte table is the tokenizer's ByteLevel decoder without its
        U+FFFD replacement)."""
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors=UTF8_ERRORS)

    def decode_answer(self, ids: Sequence[int]) -> str:
        """Text of one turn: everything before the first `eot`."""
        ids = list(ids)
        if tokens.EOT in ids:
            ids = ids[: ids.index(tokens.EOT)]
        return self.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token stands for (b"" for specials and unknown ids)."""
        if 0 <= token_id < len(self._id_bytes):
            return self._id_bytes[token_id] or b""
        return b""

    def _build_byte_table(self) -> list[bytes | None]:
        table: list[bytes | None] = [None] * self.vocab_size
        for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in self._special_ids or not (0 <= i < self.vocab_size):
                continue
            if all(c in CHAR_TO_BYTE for c in piece):
                table[i] = bytes(CHAR_TO_BYTE[c] for c in piece)
            else:  # a non-special added token is stored as plain text
                table[i] = piece.encode("utf-8")
        return table

    def incremental(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a live text-token stream into text deltas.

    Concatenated deltas (plus `flush()`) equal `decode_answer(all ids)`: incomplete UTF-8
    sequences are held until their last byte arrives, bytes that cannot be UTF-8 are dropped
    as soon as that is certain, `pad_t` and unknown ids emit nothing, and after `eot` the
    turn's text is over (later ids are ignored).
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=UTF8_ERRORS)
        self.finished = False
        self.text = ""

    def push(self, token_id: int) -> str:
        if self.finished:
            return ""
        token_id = int(token_id)
        if token_id == tokens.EOT:
            return self.flush()
        delta = self._utf8.decode(self._tokenizer.token_bytes(token_id))
        self.text += delta
        return delta

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End the stream: bytes of a character that never completed are dropped."""
        if self.finished:
            return ""
        self.finished = True
        delta = self._utf8.decode(b"", final=True)
        self.text += delta
        return delta


# ---- tiny tokenizer for the synthetic checkpoint ----------------------------------------------

_TINY_TEXT = """\
Omni is a small assistant that can see and hear. You talk to it with your voice, show it a
picture with your camera, and it answers in speech while it writes the same words as text.
When you say "stop omni" it stops talking at once and listens to you again.
The assistant hears the question, thinks about the picture, and then answers the question
in a short and friendly sentence. It can tell you what is in the picture: a cat on a chair,
a red car in the street, two people walking in the park, the weather outside the window.
Ask it about the time, the news, a recipe for dinner, or how to say hello in another
language, and it will try to help. It speaks English, and it reads numbers like 12, 2024,
3.14 and 100 percent. Questions and answers are streamed: the first words of the answer
are spoken while the rest of the answer is still being written.
The server keeps many conversations at the same time. Each conversation has its own
microphone audio, its own camera frames, and its own answer. The engine decodes text and
speech for all of them together, step by step, and sends the sound back as soon as it is
ready. If you interrupt, the answer is cancelled and the next question begins.
Testing the tokenizer: hello world, Hello World, HELLO, it's, don't, we're, they've, I'm,
you'll, she'd. Punctuation! Questions? Lists: one, two, three; four - five (six) [seven].
"""


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on the pre-tokenized text; ties go to the lexicographically smallest pair,
    so the result never depends on hash or dict order."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    text = normalizers.NFC().normalize_str(text)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(text))
    splits = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, count in words.items():
            s = splits[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        # Pairs seen once are merged too (whole rare words become tokens), so the small
        # built-in text still yields a few hundred merges.
        best_count = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == best_count)
        merges.append(best)
        for w, s in splits.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    return merges


def tiny_tokenizer_json(n_merges: int = 300) -> dict:
    """The tiny tokenizer as a tokenizer.json document (Qwen2 layout, small vocab)."""
    vocab: dict[str, int] = {c: i for i, c in enumerate(_alphabet_order())}
    merges = _learn_merges(_TINY_TEXT, n_merges)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = [
        {
            "id": len(vocab) + k,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for k, content in enumerate(QWEN2_SPECIALS)
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def write_tiny_tokenizer(directory: str | Path, n_merges: int = 300) -> Path:
    """Write tokenizer.json + tokenizer_config.json for the tiny checkpoint; byte-for-byte stable."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = tiny_tokenizer_json(n_merges)
    path = directory / TOKENIZER_FILE
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in doc["added_tokens"]
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path
