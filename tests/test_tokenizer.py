"""Text tokenizer: round trips, streaming deltas, specials, the tiny tokenizer writer."""
from __future__ import annotations

import json

import pytest

from omni2.model import tokens
from omni2.model.errors import CheckpointError
from omni2.model.tokenizer import (
    QWEN2_SPECIALS,
    TextTokenizer,
    write_tiny_tokenizer,
)

TEXTS = [
    "hello world",
    "héllo wörld 你好 🙂",
    "The assistant's answer: 3.14, 2024 — ok?\nNew line\ttab",
    "👩‍👩‍👧 family emoji, ZWJ joined; Ελληνικά; العربية; 日本語のテキスト",
    "",
    " leading and trailing spaces ",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return TextTokenizer.from_dir(d)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_merges_compress_english(tok):
    text = "the assistant answers the question"
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_no_bos_added(tok):
    # Qwen2 has no BOS: the first id already carries the first characters of the text.
    ids = tok.encode("hello")
    assert ids and "hello".startswith(tok.decode(ids[:1])) and tok.decode(ids[:1])
    assert tok.encode("") == []


def test_unknown_and_special_ids_skipped(tok):
    ids = tok.encode("hello")
    noisy = [tokens.INPUT_T] + ids[:1] + [tokens.PAD_T, tok.vocab_size, 151_000, 10**7, -1] + ids[1:] + [tokens.ASR]
    assert tok.decode(noisy) == "hello"
    # Added control tokens (<|im_end|> ...) are not transcript text either.
    special_ids = [tok.vocab_size - len(QWEN2_SPECIALS) + k for k in range(len(QWEN2_SPECIALS))]
    assert tok.decode(ids + special_ids) == "hello"


def test_decode_answer_cuts_at_first_eot(tok):
    a, b = tok.encode("first part"), tok.encode(" after eot")
    assert tok.decode_answer(a + [tokens.EOT] + b + [tokens.EOT]) == "first part"
    assert tok.decode_answer(a + [tokens.PAD_T]) == "first part"
    assert tok.decode_answer([tokens.EOT] + a) == ""


def _split_ids_mid_char(tok, text):
    """Ids from byte tokens only: every multi-byte character is split across tokens."""
    byte_vocab = {tok.token_bytes(i): i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}
    return [byte_vocab[bytes([b])] for b in text.encode("utf-8")]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_deltas_match_decode_every_prefix(tok, text):
    for ids in (tok.encode(text), _split_ids_mid_char(tok, text)):
        dec = tok.incremental()
        so_far = ""
        for n, i in enumerate(ids, 1):
            delta = dec.push(i)
            assert "\ufffd" not in delta
            so_far += delta
            # Held-back bytes are exactly an incomplete trailing character, which decode drops.
            assert tok.decode(ids[:n]) == so_far
        assert so_far + dec.flush() == tok.decode(ids) == text
        assert dec.text == text


def test_incremental_holds_back_split_character(tok):
    ids = _split_ids_mid_char(tok, "🙂")
    assert len(ids) == 4
    dec = tok.incremental()
    assert [dec.push(i) for i in ids] == ["", "", "", "🙂"]


def test_incremental_stops_at_eot_and_ignores_pad(tok):
    ids = tok.encode("héllo")
    dec = tok.incremental()
    out = dec.push_many([tokens.PAD_T] + ids + [tokens.PAD_T, 10**6])
    assert out == "héllo"
    assert dec.push(tokens.EOT) == ""
    assert dec.finished
    assert dec.push_many(tok.encode(" more")) == ""
    assert dec.text == tok.decode_answer(ids + [tokens.EOT] + tok.encode(" more"))


def test_incremental_eot_drops_incomplete_character(tok):
    ids = _split_ids_mid_char(tok, "é")[:1]
    dec = tok.incremental()
    assert dec.push(ids[0]) == ""
    assert dec.push(tokens.EOT) == ""  # a turn cut inside a character: the half is not text
    assert tok.decode(ids) == ""


def _byte_ids(tok, data: bytes) -> list[int]:
    byte_vocab = {tok.token_bytes(i): i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}
    return [byte_vocab[bytes([b])] for b in data]


# Bytes no UTF-8 text holds where they stand: what the tiny random model writes (0xEB after
# 0xEB), lone continuation bytes, a truncated 3-byte character before ASCII, 0xC0/0xFF.
NOT_UTF8 = [b"\xeb\xeb\xeb", b"\x80", b"\xe6\x97!", b"\xc0\xaf", b"\xff", b"\xf0\x9f\x99"]


@pytest.mark.parametrize("bad", NOT_UTF8)
def test_bytes_that_are_not_utf8_are_dropped_and_split_characters_survive(tok, bad):
    good = ["é", "日本", "🙂", "ok"]
    data = bad + b"".join(g.encode() + bad for g in good)
    ids = _byte_ids(tok, data)
    want = "".join(good) + ("!" * data.count(b"!"))
    dec = tok.incremental()
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    text = "".join(deltas)
    assert "\ufffd" not in text
    assert sorted(text) == sorted(want)          # every valid character, nothing else
    for g in good:
        assert g in text, (g, text)
    assert text == dec.text == tok.decode(ids) == tok.decode_answer(ids + [tokens.EOT])


def test_random_token_streams_give_no_replacement_characters(tok):
    """Like the tiny model: arbitrary ids (bytes, merges, specials, ids past the vocab)."""
    import random

    rng = random.Random(13)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size + 20) for _ in range(rng.randrange(1, 40))]
        dec = tok.incremental()
        streamed = "".join(dec.push(i) for i in ids) + dec.flush()
        assert "\ufffd" not in streamed
        assert streamed == tok.decode_answer(ids + [tokens.EOT])


def test_writer_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_tiny_tokenizer(a)
    write_tiny_tokenizer(b)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    doc = json.loads((a / "tokenizer.json").read_text())
    assert doc["model"]["type"] == "BPE"
    assert doc["decoder"]["type"] == "ByteLevel"
    assert 200 <= len(doc["model"]["merges"]) <= 400
    assert json.loads((a / "tokenizer_config.json").read_text())["bos_token"] is None


def test_missing_tokenizer_names_file(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_names_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config_names_file(tmp_path):
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        TextTokenizer.from_dir(tmp_path)


def test_config_is_optional(tmp_path):
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    assert TextTokenizer.from_dir(tmp_path).decode(TextTokenizer.from_dir(tmp_path).encode("ok")) == "ok"
