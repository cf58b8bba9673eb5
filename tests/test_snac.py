"""SNAC speech tokens: frame layout, delay pattern, codec loading, streaming decode == one-shot."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omni2.model import tokens
from omni2.model.errors import CheckpointError
from omni2.model.snac_codec import (
    TINY_SNAC_CONFIG,
    build_snac,
    decode_frames,
    InferenceSnake,
    load_snac,
    noise_blocks,
    prepare_for_inference,
    real_size_config,
    set_noise_mode,
    write_tiny_snac,
)
from omni2.model.snac_layout import (
    SAMPLES_PER_FRAME,
    FrameAssembler,
    codes_to_frames,
    frames_from_steps,
    frames_to_codes,
    sanitize_frames,
)
from omni2.streaming.engine.frame_decoder import DecodeWindow, FrameDecoder, decode_groups, receptive_field


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_snac(tmp_path_factory.mktemp("snac"), seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_snac(str(tiny_dir))


def random_frames(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens.SNAC_CODEBOOK, (n, 7), generator=g)


def stream(decoder, frames, chunk=1):
    parts = [decoder.push(frames[i : i + chunk]) for i in range(0, len(frames), chunk)]
    return np.concatenate(parts + [decoder.flush()])


# ---- layout --------------------------------------------------------------------------------

def test_frame_layout_matches_spec_and_round_trips():
    frames = torch.arange(3 * 5 * 7).reshape(3, 5, 7)
    c0, c1, c2 = frames_to_codes(frames)
    assert c0.shape == (3, 5) and c1.shape == (3, 10) and c2.shape == (3, 20)
    b, t = 1, 2
    f = frames[b, t]
    assert c0[b, t] == f[0]
    assert c1[b, 2 * t] == f[1] and c1[b, 2 * t + 1] == f[4]
    assert [int(c2[b, 4 * t + i]) for i in range(4)] == [int(f[2]), int(f[3]), int(f[5]), int(f[6])]
    assert torch.equal(codes_to_frames([c0, c1, c2]), frames)
    single = frames[0]
    assert all(c.shape[0] == 1 for c in frames_to_codes(single))
    assert torch.equal(codes_to_frames(frames_to_codes(single))[0], single)
    with pytest.raises(ValueError):
        frames_to_codes(torch.zeros(4, 6, dtype=torch.long))


def test_delay_pattern_reads_layer_a_from_step_t_plus_a_plus_1():
    # step s, layer a holds 100*s + a; the early steps also carry pad_a as the model emits them.
    n_steps = 12
    steps = [[100 * s + a for a in range(7)] for s in range(n_steps)]
    for a in range(7):
        for s in range(a + 1):
            steps[s][a] = tokens.PAD_A
    frames = frames_from_steps(steps)
    assert frames.shape == (n_steps - 7, 7)
    for t in range(frames.shape[0]):
        for a in range(7):
            assert frames[t, a] == 100 * (t + a + 1) + a
    # Nothing forced: a special sampled inside a frame stays there (sanitizing is a separate step).
    steps[3][1] = tokens.EOA  # frame 1, layer 1
    assert frames_from_steps(steps)[1, 1] == tokens.EOA
    for s in range(8):
        assert frames_from_steps(steps[:s]).shape == (max(0, s - 7), 7)
    assert frames_from_steps([]).shape == (0, 7)


def test_frame_assembler_equals_frames_from_steps():
    steps = torch.randint(0, tokens.PADDED_AUDIO_VOCAB, (20, 7), generator=torch.Generator().manual_seed(3))
    asm = FrameAssembler()
    got = []
    for s, row in enumerate(steps):
        frame = asm.push(row)
        assert (frame is None) == (s < 7)  # frame t completes at step t+7
        if frame is not None:
            got.append(frame)
    assert asm.n_frames == 13
    assert torch.equal(torch.stack(got), frames_from_steps(steps))


def test_sanitize_frames_maps_specials_to_zero_and_counts():
    frames = torch.tensor([[1, 2, tokens.PAD_A, 4095, tokens.EOA, 0, 7]])
    clean, n_bad = sanitize_frames(frames)
    assert n_bad == 2
    assert clean.tolist() == [[1, 2, 0, 4095, 0, 0, 7]]
    same, zero = sanitize_frames(clean)
    assert zero == 0 and torch.equal(same, clean)


# ---- codec -------------------------------------------------------------------------------

def test_tiny_snac_is_deterministic_small_and_has_real_frame_arithmetic(tmp_path, tiny_dir, tiny):
    other = write_tiny_snac(tmp_path / "again", seed=0)
    assert (other / "pytorch_model.bin").stat().st_size < 5_000_000
    a = torch.load(other / "pytorch_model.bin", weights_only=True)
    b = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = torch.load(write_tiny_snac(tmp_path / "seed1", seed=1) / "pytorch_model.bin", weights_only=True)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert tiny.hop_length == 512 and tiny.vq_strides == [4, 2, 1] and tiny.codebook_size == 4096
    audio = decode_frames(tiny, random_frames(3))
    assert audio.shape == (1, 3 * SAMPLES_PER_FRAME)
    assert torch.isfinite(audio).all() and audio.std() > 1e-3


def test_noise_modes(tiny_dir):
    model = load_snac(str(tiny_dir))
    frames = random_frames(4)
    positional = decode_frames(model, frames)
    assert torch.equal(positional, decode_frames(model, frames))  # deterministic
    shifted = decode_frames(model, frames, start_frames=[5])
    assert not torch.allclose(positional, shifted)  # noise follows absolute position
    set_noise_mode(model, "zero")
    zero = decode_frames(model, frames)
    assert torch.equal(zero, decode_frames(model, frames)) and not torch.allclose(zero, positional)
    set_noise_mode(model, "random")
    assert not torch.equal(decode_frames(model, frames), decode_frames(model, frames))
    with pytest.raises(ValueError):
        set_noise_mode(model, "loud")


def test_positional_noise_table_is_the_formula_bitwise(tiny_dir):
    """The noise is read from a table grown on demand: the same bits as computing it per call,
    for rows at different positions, past the table's first size and before it is built."""
    model = load_snac(str(tiny_dir))
    block = noise_blocks(model)[-1]
    block.frame_start, block.n_frames = torch.tensor([0, 7, 40]), 3
    length = 3 * SAMPLES_PER_FRAME
    got = block.noise(3, length, "cpu", torch.float32)
    for row, start in enumerate((0, 7, 40)):
        pos = torch.arange(start * SAMPLES_PER_FRAME, start * SAMPLES_PER_FRAME + length)
        assert torch.equal(got[row, 0], block.positional(pos).to(torch.float32))
    assert block._table.numel() >= 43 * SAMPLES_PER_FRAME
    fresh = load_snac(str(tiny_dir))
    frames = torch.stack([random_frames(5, seed=3), random_frames(5, seed=4)])
    for _ in range(2):   # first call builds the tables, the second reads them
        assert torch.equal(decode_frames(model, frames, [200, 3]), decode_frames(fresh, frames, [200, 3]))


def test_load_snac_errors(tmp_path, tiny_dir, monkeypatch):
    with pytest.raises(CheckpointError, match="no such SNAC directory"):
        load_snac(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(TINY_SNAC_CONFIG, encoder_rates=[4, 4, 8, 8])))
    (bad / "pytorch_model.bin").write_bytes((tiny_dir / "pytorch_model.bin").read_bytes())
    with pytest.raises(CheckpointError, match="hop_length=1024"):
        load_snac(str(bad))
    for key, value, msg in [
        ("vq_strides", [8, 4, 2, 1], "vq_strides"),
        ("sampling_rate", 32000, "sampling_rate"),
        ("codebook_size", 1024, "codebook_size"),
        ("attn_window_size", 32, "attn_window_size"),
    ]:
        (bad / "config.json").write_text(json.dumps(dict(TINY_SNAC_CONFIG, **{key: value})))
        with pytest.raises(CheckpointError, match=msg):
            load_snac(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot parse"):
        load_snac(str(bad))
    (bad / "config.json").write_text(json.dumps(dict(TINY_SNAC_CONFIG, decoder_dim=64)))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_snac(str(bad))
    (bad / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_snac(str(bad))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        load_snac("hubertsiuzdak/snac_24khz_not_cached")


# ---- streaming -----------------------------------------------------------------------------

@pytest.mark.parametrize("n_frames", [1, 3, 4, 5, 13])
@pytest.mark.parametrize("group", [2, 3, 4])
def test_streaming_equals_one_shot_with_tail(tiny, n_frames, group):
    frames = random_frames(n_frames, seed=n_frames)
    whole = decode_frames(tiny, frames)[0].numpy()
    out = stream(FrameDecoder(tiny, group_frames=group), frames)
    assert out.dtype == np.float32 and out.shape == whole.shape
    assert np.abs(out - whole).max() < 1e-3
    if n_frames >= 5:  # pushing several frames at once gives the same audio
        assert np.abs(stream(FrameDecoder(tiny, group_frames=group), frames, chunk=5) - whole).max() < 1e-3


def test_streaming_emits_early_and_needs_its_context(tiny):
    frames = random_frames(16, seed=7)
    whole = decode_frames(tiny, frames)[0].numpy()
    dec = FrameDecoder(tiny, group_frames=4)
    chunks = [dec.push(frames[i : i + 1]) for i in range(16)]
    assert [len(c) for c in chunks[:3]] == [0, 0, 0] and len(chunks[3]) == 4 * SAMPLES_PER_FRAME - dec.hold_back
    assert all(len(c) == 4 * SAMPLES_PER_FRAME for c in chunks[7::4])
    # The reference's independent 4-frame groups (and a decoder without context) are not exact.
    naive = stream(FrameDecoder(tiny, group_frames=4, context_frames=0, hold_back=0), frames)
    assert np.abs(naive - whole).max() > 1e-2
    with pytest.raises(RuntimeError):
        dec.flush(), dec.push(frames[:1])


def test_receptive_field_bounds_the_measured_influence(tiny):
    left, right = receptive_field(tiny)
    assert left == right == 5268
    frames = random_frames(20, seed=1)
    base = decode_frames(tiny, frames)[0]
    t = 10
    for layer in range(7):
        changed = frames.clone()
        changed[t, layer] = (changed[t, layer] + 1000) % 4096
        diff = (decode_frames(tiny, changed)[0] - base).abs()
        idx = torch.nonzero(diff > 0).flatten()
        assert idx.numel() > 0
        assert idx.min() >= t * SAMPLES_PER_FRAME - left
        assert idx.max() < (t + 1) * SAMPLES_PER_FRAME + right
        # ...and the bound is not loose by more than a quarter frame.
        far = max(t * SAMPLES_PER_FRAME - int(idx.min()), int(idx.max()) - (t + 1) * SAMPLES_PER_FRAME)
        assert far > right - SAMPLES_PER_FRAME


def test_sanitized_specials_are_counted(tiny):
    frames = random_frames(5)
    frames[2, 3] = tokens.PAD_A
    dec = FrameDecoder(tiny, group_frames=2)
    out = stream(dec, frames)
    assert dec.n_bad_codes == 1 and len(out) == 5 * SAMPLES_PER_FRAME


def test_batched_windows_equal_per_session(tiny):
    lengths = [9, 13, 13, 4]
    utterances = [random_frames(n, seed=20 + i) for i, n in enumerate(lengths)]
    solo = [stream(FrameDecoder(tiny, group_frames=3), u) for u in utterances]
    decoders = [FrameDecoder(tiny, group_frames=3) for _ in utterances]
    outs = [[] for _ in utterances]
    for step in range(max(lengths) + 1):
        active, windows = [], []
        for i, (dec, u) in enumerate(zip(decoders, utterances)):
            if dec.finished:
                continue
            final = step == len(u)
            if not final:
                dec.append(u[step : step + 1])
            w = dec.next_window(final=final)
            if final:
                dec.finished = True
            if w is not None:
                active.append(i)
                windows.append(w)
        for i, w, audio in zip(active, windows, decode_groups(tiny, windows)):
            outs[i].append(decoders[i].accept(w, audio))
    for got, want in zip(outs, solo):
        assert np.abs(np.concatenate(got) - want).max() < 1e-5


def test_decode_groups_batches_equal_lengths_exactly(tiny):
    windows = [DecodeWindow(random_frames(6, seed=s), start_frame=3 * s) for s in range(3)]
    windows.append(random_frames(2, seed=9))  # a bare tensor, other length: its own call
    together = decode_groups(tiny, windows)
    for w, audio in zip(windows, together):
        (alone,) = decode_groups(tiny, [w])
        assert audio.shape == alone.shape and np.abs(audio - alone).max() < 1e-5
    assert not np.allclose(together[0], together[1][: len(together[0])])


@pytest.mark.slow
def test_real_size_architecture_streams_exactly():
    torch.manual_seed(0)
    model = build_snac(real_size_config())
    assert receptive_field(model) == (5268, 5268)  # same kernels/strides as the tiny codec
    frames = random_frames(13, seed=2)
    whole = decode_frames(model, frames)[0].numpy()
    for group in (2, 4):
        out = stream(FrameDecoder(model, group_frames=group), frames)
        assert out.shape == whole.shape and np.abs(out - whole).max() < 1e-3
    naive = stream(FrameDecoder(model, group_frames=4, context_frames=3, hold_back=2048), frames)
    assert np.abs(naive - whole).max() > 1e-3


@pytest.mark.parametrize("size", ["tiny", "real"])
def test_inference_preparation_keeps_the_audio_bitwise(size):
    """Folded weight norms and the one-buffer Snake: not one bit of the audio moves."""
    config = dict(TINY_SNAC_CONFIG) if size == "tiny" else real_size_config()
    torch.manual_seed(4)
    plain = build_snac(config)
    prepared = build_snac(config)
    prepared.load_state_dict(plain.state_dict())
    prepare_for_inference(prepared)
    assert not any(type(m).__name__ in ("Snake1d", "ParametrizedConv1d", "ParametrizedConvTranspose1d")
                   for m in prepared.modules())
    assert any(isinstance(m, InferenceSnake) for m in prepared.modules())
    frames = torch.stack([random_frames(6, seed=s) for s in (1, 2)])
    assert torch.equal(decode_frames(prepared, frames, [0, 5]), decode_frames(plain, frames, [0, 5]))
    assert receptive_field(prepared) == receptive_field(plain)


def test_load_snac_returns_a_prepared_codec(tiny):
    assert any(isinstance(m, InferenceSnake) for m in tiny.modules())
