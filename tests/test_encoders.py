"""Speech and image encoders: reference parity on tiny synthetic checkpoints, strict loading."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import whisper
from PIL import Image
from torch import nn

from omni2.model.audio_encoder import AudioEncoder, log_mel, whisper_frames, write_tiny_whisper
from omni2.model.errors import CheckpointError
from omni2.model.vision import VisionEncoder, preprocess_image, write_tiny_clip

# The CLIP release is TorchScript, which torch now marks deprecated; the notices are expected.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@pytest.fixture(scope="module")
def whisper_path(tmp_path_factory):
    return write_tiny_whisper(tmp_path_factory.mktemp("ckpt") / "small.pt")


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("ckpt") / "ViT-B-32.pt")


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


# ---- speech --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, frames",
    [(0, 1), (1, 1), (319, 1), (320, 2), (8000, 26), (16000, 51), (48000, 151), (479_999, 1500),
     (480_000, 1500), (16000 * 45, 1500)],
)
def test_whisper_frames(n, frames):
    assert whisper_frames(n) == frames


def test_whisper_frames_rejects_negative():
    with pytest.raises(ValueError):
        whisper_frames(-1)


def test_log_mel_is_whispers_30s_window():
    x = speech(2.0)
    mel = log_mel(x)
    assert mel.shape == (80, 3000) and mel.dtype == torch.float32
    assert torch.equal(mel, whisper.log_mel_spectrogram(whisper.pad_or_trim(x)))
    assert torch.equal(log_mel(torch.from_numpy(x)), mel)
    assert torch.equal(log_mel(x.astype(np.float64)), mel)  # reference audio is float32
    long = speech(40.0, seed=1)
    assert torch.equal(log_mel(long), log_mel(long[: 30 * 16000]))
    with pytest.raises(ValueError, match="1-D"):
        log_mel(np.zeros((2, 16000), dtype=np.float32))


def test_tiny_whisper_layout(whisper_path):
    ckpt = torch.load(whisper_path, map_location="cpu", weights_only=True)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt["dims"]))
    assert set(ckpt["model_state_dict"]) == set(model.state_dict())
    assert any(k.startswith("decoder.") for k in ckpt["model_state_dict"])
    assert all(v.dtype == torch.float16 for v in ckpt["model_state_dict"].values())
    assert ckpt["dims"]["n_audio_ctx"] == 1500 and ckpt["dims"]["n_audio_state"] == 32
    assert whisper_path.stat().st_size < 5_000_000


def test_tiny_whisper_is_deterministic(tmp_path):
    a = torch.load(write_tiny_whisper(tmp_path / "a" / "small.pt"), weights_only=True)["model_state_dict"]
    b = torch.load(write_tiny_whisper(tmp_path / "b" / "small.pt"), weights_only=True)["model_state_dict"]
    c = torch.load(write_tiny_whisper(tmp_path / "c" / "small.pt", seed=1), weights_only=True)["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv1.weight"], c["encoder.conv1.weight"])
    assert (tmp_path / "a" / "small.pt").read_bytes() == (tmp_path / "b" / "small.pt").read_bytes()


def test_audio_encoder_matches_whisper_reference(whisper_path):
    ours = AudioEncoder.from_whisper_checkpoint(whisper_path)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert ours.out_dim == 32 and not ours.training
    reference = whisper.load_model(str(whisper_path), device="cpu")
    mel = torch.stack([log_mel(speech(0.5)), log_mel(speech(3.0, seed=2))])
    with torch.no_grad():
        got = ours(mel)
        want = reference.embed_audio(mel)
    assert got.shape == (2, 1500, 32)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert got.std() > 0.1  # random weights give a non-degenerate signal to compare


def test_audio_encode_keeps_first_L_frames(whisper_path):
    ours = AudioEncoder.from_whisper_checkpoint(whisper_path)
    x = speech(3.0)
    feats = ours.encode(x)
    assert feats.shape == (151, 32)
    with torch.no_grad():
        assert torch.equal(feats, ours(log_mel(x)[None])[0, :151])


def test_audio_encoder_rejects_wrong_mel_shape(whisper_path):
    ours = AudioEncoder.from_whisper_checkpoint(whisper_path)
    with pytest.raises(ValueError, match=r"\[B, 80, 3000\]"):
        ours(torch.zeros(1, 80, 1000))


def _resave(tmp_path, whisper_path, edit) -> str:
    ckpt = torch.load(whisper_path, map_location="cpu", weights_only=True)
    edit(ckpt)
    out = tmp_path / "edited.pt"
    torch.save(ckpt, out)
    return out


def test_whisper_loader_errors(tmp_path, whisper_path):
    with pytest.raises(CheckpointError, match="not found"):
        AudioEncoder.from_whisper_checkpoint(tmp_path / "nope.pt")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read"):
        AudioEncoder.from_whisper_checkpoint(junk)

    cut = tmp_path / "cut.pt"
    data = whisper_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: cannot read"):
        AudioEncoder.from_whisper_checkpoint(cut)

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a whisper checkpoint"):
        AudioEncoder.from_whisper_checkpoint(other)

    key = "encoder.blocks.0.attn.query.weight"
    p = _resave(tmp_path, whisper_path, lambda c: c["model_state_dict"].pop(key))
    with pytest.raises(CheckpointError, match=f"missing key.*{key}"):
        AudioEncoder.from_whisper_checkpoint(p)

    p = _resave(tmp_path, whisper_path, lambda c: c["model_state_dict"].update({"encoder.blocks.1.mlp_ln.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match="unexpected key.*encoder.blocks.1.mlp_ln.weight"):
        AudioEncoder.from_whisper_checkpoint(p)

    p = _resave(tmp_path, whisper_path, lambda c: c["model_state_dict"].update({"encoder.ln_post.bias": torch.zeros(31)}))
    with pytest.raises(CheckpointError, match=r"encoder.ln_post.bias has shape \[31\], expected \[32\]"):
        AudioEncoder.from_whisper_checkpoint(p)

    p = _resave(tmp_path, whisper_path, lambda c: c["dims"].pop("n_audio_layer"))
    with pytest.raises(CheckpointError, match="n_audio_layer"):
        AudioEncoder.from_whisper_checkpoint(p)

    # Decoder damage is irrelevant: only the encoder is used.
    p = _resave(tmp_path, whisper_path, lambda c: c["model_state_dict"].pop("decoder.ln.weight"))
    AudioEncoder.from_whisper_checkpoint(p)


# ---- image -------------------------------------------------------------------------------
VISUAL_KEYS = {
    "visual.class_embedding": (64,),
    "visual.positional_embedding": (50, 64),
    "visual.proj": (64, 16),
    "visual.conv1.weight": (64, 3, 32, 32),
    "visual.ln_pre.weight": (64,),
    "visual.ln_pre.bias": (64,),
    "visual.transformer.resblocks.0.attn.in_proj_weight": (192, 64),
    "visual.transformer.resblocks.0.attn.in_proj_bias": (192,),
    "visual.transformer.resblocks.0.attn.out_proj.weight": (64, 64),
    "visual.transformer.resblocks.0.attn.out_proj.bias": (64,),
    "visual.transformer.resblocks.0.ln_1.weight": (64,),
    "visual.transformer.resblocks.0.ln_1.bias": (64,),
    "visual.transformer.resblocks.0.mlp.c_fc.weight": (256, 64),
    "visual.transformer.resblocks.0.mlp.c_fc.bias": (256,),
    "visual.transformer.resblocks.0.mlp.c_proj.weight": (64, 256),
    "visual.transformer.resblocks.0.mlp.c_proj.bias": (64,),
    "visual.transformer.resblocks.0.ln_2.weight": (64,),
    "visual.transformer.resblocks.0.ln_2.bias": (64,),
    "visual.ln_post.weight": (64,),
    "visual.ln_post.bias": (64,),
}
TEXT_KEYS = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
             "text_projection", "logit_scale", "transformer.resblocks.0.attn.in_proj_weight",
             "transformer.resblocks.0.mlp.c_proj.bias"}


def test_tiny_clip_archive_layout(clip_path):
    state = torch.jit.load(str(clip_path), map_location="cpu").state_dict()
    visual = {k: tuple(v.shape) for k, v in state.items() if k.startswith("visual.")}
    assert visual == VISUAL_KEYS
    assert TEXT_KEYS <= set(state)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert clip_path.stat().st_size < 2_000_000


def test_tiny_clip_is_deterministic(tmp_path, clip_path):
    again = write_tiny_clip(tmp_path / "ViT-B-32.pt")
    a = torch.jit.load(str(clip_path)).state_dict()
    b = torch.jit.load(str(again)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def clip_reference(state: dict, image: torch.Tensor, all_tokens: bool) -> torch.Tensor:
    """CLIP's ViT written independently: torch.nn.MultiheadAttention in CLIP's [tokens, batch, width]."""
    s = {k[len("visual."):]: v.float() for k, v in state.items() if k.startswith("visual.")}
    width = s["conv1.weight"].shape[0]
    x = F.conv2d(image, s["conv1.weight"], stride=s["conv1.weight"].shape[-1])
    x = x.reshape(x.shape[0], width, -1).permute(0, 2, 1)
    x = torch.cat([s["class_embedding"] + torch.zeros(x.shape[0], 1, width), x], dim=1) + s["positional_embedding"]
    ln = lambda t, name: F.layer_norm(t, (width,), s[f"{name}.weight"], s[f"{name}.bias"])
    x = ln(x, "ln_pre").permute(1, 0, 2)
    blocks = sorted({int(k.split(".")[2]) for k in s if k.startswith("transformer.resblocks.")})
    for i in blocks:
        b = f"transformer.resblocks.{i}."
        mha = nn.MultiheadAttention(width, width // 64)
        mha.load_state_dict({k[len(b + "attn."):]: v for k, v in s.items() if k.startswith(b + "attn.")})
        h = ln(x, b + "ln_1")
        x = x + mha(h, h, h, need_weights=False)[0]
        h = F.linear(ln(x, b + "ln_2"), s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)
    x = ln(x if all_tokens else x[:, 0, :], "ln_post")
    return x @ s["proj"]


def test_vision_encoder_matches_independent_clip(clip_path):
    ours = VisionEncoder.from_clip_torchscript(clip_path)
    assert ours.dims == dict(width=64, patch_size=32, grid=7, layers=1, heads=1, output_dim=16)
    assert all(p.dtype == torch.float32 for p in ours.parameters()) and not ours.training
    state = torch.jit.load(str(clip_path), map_location="cpu").state_dict()
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(image)
        cls = clip_reference(state, image, all_tokens=False)  # CLIP's encode_image
        tokens = clip_reference(state, image, all_tokens=True)
    assert got.shape == (2, 50, 16)
    assert torch.allclose(got[:, 0], cls, atol=1e-5, rtol=0)
    assert torch.allclose(got, tokens, atol=1e-5, rtol=0)
    assert got.std() > 0.1


def test_vision_encoder_matches_openai_clip_if_present(clip_path):
    clip_model = pytest.importorskip("clip.model", reason="openai-clip (with torchvision) not installed")
    state = torch.jit.load(str(clip_path), map_location="cpu").state_dict()
    reference = clip_model.build_model(dict(state)).float().eval()
    ours = VisionEncoder.from_clip_torchscript(clip_path)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(image)[:, 0], reference.encode_image(image), atol=1e-5, rtol=0)


def test_vision_encode_from_bytes(clip_path):
    ours = VisionEncoder.from_clip_torchscript(clip_path)
    feats = ours.encode(png_bytes(synthetic_image(320, 240)))
    assert feats.shape == (50, 16)
    with pytest.raises(ValueError, match=r"\[B, 3, 224, 224\]"):
        ours(torch.zeros(1, 3, 200, 200))


def synthetic_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], axis=-1)
    noise = rng.integers(-20, 20, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def manual_clip_preprocess(img: Image.Image, resized: tuple[int, int], left: int, top: int) -> torch.Tensor:
    if resized != img.size:
        img = img.resize(resized, Image.BICUBIC)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)[top : top + 224, left : left + 224] / 255.0
    return torch.from_numpy(((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy())


@pytest.mark.parametrize(
    "size, resized, left, top",
    [
        ((320, 240), (298, 224), 37, 0),   # landscape: 224 * 320 / 240 = 298.67 -> 298
        ((240, 320), (224, 298), 0, 37),   # portrait
        ((301, 224), (301, 224), 38, 0),   # no resize; crop offset round(38.5) = 38 (half to even)
        ((224, 224), (224, 224), 0, 0),
        ((100, 50), (448, 224), 112, 0),   # upscaling
    ],
)
def test_preprocess_image_follows_clip_rule(size, resized, left, top):
    img = synthetic_image(*size)
    got = preprocess_image(img)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert torch.allclose(got, manual_clip_preprocess(img, resized, left, top), atol=1e-6, rtol=0)
    assert torch.equal(preprocess_image(png_bytes(img)), got)


def test_preprocess_image_converts_modes():
    rgb = synthetic_image(320, 240)
    grey = rgb.convert("L")
    got = preprocess_image(grey)
    assert got.shape == (3, 224, 224)
    pixels = got * torch.from_numpy(CLIP_STD)[:, None, None] + torch.from_numpy(CLIP_MEAN)[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)
    assert preprocess_image(rgb.convert("RGBA")).shape == (3, 224, 224)


def test_preprocess_image_rejects_undecodable():
    with pytest.raises(ValueError, match="cannot decode image"):
        preprocess_image(b"definitely not an image")
    data = png_bytes(synthetic_image(320, 240))
    with pytest.raises(ValueError, match="cannot decode image"):
        preprocess_image(data[: len(data) // 2])
    with pytest.raises(TypeError):
        preprocess_image(np.zeros((224, 224, 3)))


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def archive_from_state(state: dict, path) -> str:
    """A TorchScript archive whose state_dict is exactly `state` (any names, any shapes)."""
    root = _Holder()
    for name, tensor in state.items():
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))
    return path


def test_clip_loader_errors(tmp_path, clip_path):
    with pytest.raises(CheckpointError, match="not found"):
        VisionEncoder.from_clip_torchscript(tmp_path / "nope.pt")

    plain = tmp_path / "plain.pt"
    torch.save({"visual.proj": torch.zeros(64, 16)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt: not a readable TorchScript archive"):
        VisionEncoder.from_clip_torchscript(plain)

    cut = tmp_path / "cut.pt"
    data = clip_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable TorchScript archive"):
        VisionEncoder.from_clip_torchscript(cut)

    state = torch.jit.load(str(clip_path), map_location="cpu").state_dict()
    state = {k: v for k, v in state.items() if v.is_floating_point()}

    # The helper archive itself loads: the error cases below differ only by their edit.
    assert VisionEncoder.from_clip_torchscript(archive_from_state(state, tmp_path / "same.pt")).dims["layers"] == 1

    key = "visual.transformer.resblocks.0.mlp.c_fc.bias"
    edited = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match=f"missing key.*{key}"):
        VisionEncoder.from_clip_torchscript(archive_from_state(edited, tmp_path / "missing.pt"))

    edited = dict(state, **{"visual.ln_post.extra": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected key.*visual.ln_post.extra"):
        VisionEncoder.from_clip_torchscript(archive_from_state(edited, tmp_path / "extra.pt"))

    edited = dict(state, **{"visual.ln_pre.bias": torch.zeros(65)})
    with pytest.raises(CheckpointError, match=r"visual.ln_pre.bias has shape \[65\], expected \[64\]"):
        VisionEncoder.from_clip_torchscript(archive_from_state(edited, tmp_path / "shape.pt"))

    text_only = {k: v for k, v in state.items() if not k.startswith("visual.")}
    with pytest.raises(CheckpointError, match="no visual"):
        VisionEncoder.from_clip_torchscript(archive_from_state(text_only, tmp_path / "text.pt"))
