"""The released on-disk layout: key names/shapes, strict loading, clear errors, hub cache."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from omni2.model import checkpoint as ck
from omni2.model.config import PRESETS, ModelConfig
from omni2.model.errors import CheckpointError
from omni2.model.lm import OmniLM
from speech import requires_speech, speak


def spec_key_shapes(cfg: ModelConfig) -> dict:
    """The state-dict keys of lit_model.pth as the spec lists them (section 1), with shapes."""
    C, V, F = cfg.n_embd, cfg.padded_vocab_size, cfg.intermediate_size
    keys = {"transformer.wte.weight": (V, C), "lm_head.weight": (V, C), "transformer.ln_f.weight": (C,)}
    for n in range(cfg.n_layer):
        b = f"transformer.h.{n}."
        keys.update({
            b + "norm_1.weight": (C,), b + "norm_2.weight": (C,),
            b + "attn.attn.weight": (cfg.qkv_rows, C), b + "attn.attn.bias": (cfg.qkv_rows,),
            b + "attn.proj.weight": (C, cfg.n_head * cfg.head_size),
            b + "mlp.fc_1.weight": (F, C), b + "mlp.fc_2.weight": (F, C), b + "mlp.proj.weight": (C, F),
        })
    for name, dim in (("whisper_adapter", cfg.whisper_adapter_dim), ("vision_adapter", cfg.vision_adapter_dim)):
        keys.update({f"{name}.fc_1.weight": (F, dim), f"{name}.fc_2.weight": (F, dim), f"{name}.proj.weight": (C, F)})
    return keys


def test_released_dims_match_the_spec():
    cfg = PRESETS["mini-omni2"]
    with torch.device("meta"):
        lm = OmniLM(cfg)
    got = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    assert got == spec_key_shapes(cfg)
    assert got["transformer.h.0.attn.attn.weight"] == (1152, 896)
    assert got["transformer.wte.weight"] == (181120, 896)


def test_tiny_checkpoint_has_the_released_layout(tiny_checkpoint):
    for name in ck.REQUIRED_FILES + ("tokenizer_config.json", "snac/config.json", "snac/pytorch_model.bin"):
        assert (tiny_checkpoint / name).is_file(), name
    state = torch.load(tiny_checkpoint / ck.LM_FILE, weights_only=True)
    cfg = ModelConfig.from_yaml(tiny_checkpoint / ck.CONFIG_FILE)
    assert cfg == PRESETS["tiny"]
    assert {k: tuple(v.shape) for k, v in state.items()} == spec_key_shapes(cfg)
    assert all(v.dtype == torch.float32 for v in state.values())
    raw = yaml.safe_load((tiny_checkpoint / ck.CONFIG_FILE).read_text())
    assert raw["padded_vocab_size"] == 181120 and raw["rope_base"] == 1_000_000
    whisper = torch.load(tiny_checkpoint / ck.WHISPER_FILE, weights_only=True)
    assert set(whisper) == {"dims", "model_state_dict"}
    assert whisper["dims"]["n_audio_state"] == cfg.whisper_adapter_dim
    clip = torch.jit.load(str(tiny_checkpoint / ck.CLIP_FILE)).state_dict()
    assert clip["visual.proj"].shape[1] == cfg.vision_adapter_dim
    total = sum(f.stat().st_size for f in tiny_checkpoint.rglob("*") if f.is_file())
    assert total < 100e6


@pytest.fixture()
def ckpt_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_load_is_strict_and_names_the_key(ckpt_copy):
    path = ckpt_copy / ck.LM_FILE
    state = torch.load(path, weights_only=True)
    good = dict(state)

    state["transformer.h.0.attn.attn.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"lit_model\.pth.*transformer\.h\.0\.attn\.attn\.weight has shape \[3, 3\]"):
        ck.load_lm(ckpt_copy)

    state = dict(good)
    del state["vision_adapter.proj.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) vision_adapter\.proj\.weight"):
        ck.load_lm(ckpt_copy)

    state = dict(good, **{"transformer.h.9.extra": torch.zeros(1)})
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) transformer\.h\.9\.extra"):
        ck.load_lm(ckpt_copy)


def test_truncated_weights_and_missing_files_are_clear_errors(ckpt_copy):
    path = ckpt_copy / ck.LM_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"lit_model\.pth: cannot read weights"):
        ck.load_lm(ckpt_copy)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"missing lit_model\.pth"):
        ck.resolve_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        ck.resolve_checkpoint(ckpt_copy / "nope" / "deeper")


def test_unsupported_config_is_refused(ckpt_copy):
    cfg = yaml.safe_load((ckpt_copy / ck.CONFIG_FILE).read_text())
    cfg["parallel_residual"] = True
    (ckpt_copy / ck.CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="parallel_residual"):
        ck.load_lm(ckpt_copy)


def test_hub_repo_is_found_in_the_offline_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """`gpt-omni/mini-omni2` resolves from a Hugging Face cache with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--gpt-omni--mini-omni2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    assert ck.resolve_checkpoint(ck.HUB_REPO) == repo / "snapshots" / commit
    with pytest.raises(CheckpointError, match="cannot get the checkpoint"):
        ck.resolve_checkpoint("nobody/absent-model")


def _generate_json(ckpt, wav, jpg, out_wav):
    cmd = [sys.executable, "-m", "omni2.clients.cli", "generate", "--checkpoint", str(ckpt), "--audio", str(wav),
           "--image", str(jpg), "--max-steps", "24", "--json", "--wav", str(out_wav)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@requires_speech
def test_generate_end_to_end_is_deterministic(tiny_checkpoint, tmp_path):
    from PIL import Image
    import numpy as np
    import soundfile as sf

    wav = tmp_path / "q.wav"
    sf.write(str(wav), speak("what do you see in this picture"), 16000)

    jpg = tmp_path / "pic.jpg"
    Image.fromarray((np.random.RandomState(0).rand(200, 300, 3) * 255).astype("uint8")).save(jpg)
    a = _generate_json(tiny_checkpoint, wav, jpg, tmp_path / "a.wav")
    b = _generate_json(tiny_checkpoint, wav, jpg, tmp_path / "b.wav")
    assert a == b
    row0, row1 = a["prompt_ids"]
    assert len(row0) == len(row1) == 8
    n_frames = len(sf.read(str(wav))[0]) / sf.info(str(wav)).samplerate * 1000 // 20 + 1
    assert len(row0[7]) == n_frames + 55
    assert row0[0][0] == 4101 and row0[0][-1] == 4099 and row1[0][-1] == 4097
    steps = len(a["text_tokens"])
    assert steps == len(a["audio_tokens"]) and all(len(s) == 7 for s in a["audio_tokens"])
    assert 1 <= steps <= 24
    assert a["wav_samples"] == max(0, steps - 7) * 2048
    pcm, rate = sf.read(str(tmp_path / "a.wav"))
    assert rate == 24000 and len(pcm) == a["wav_samples"]


def test_generate_reports_bad_checkpoint_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "omni2.clients.cli", "generate", "--checkpoint", str(tmp_path), "--text", "hi"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "not a Mini-Omni2 checkpoint, missing lit_model.pth" in done.stderr
    assert "Traceback" not in done.stderr


def test_generate_summary_says_when_no_wav_was_asked_for(tiny_checkpoint):
    """Without --wav no audio is decoded: the summary says so instead of 'wav samples: 0'."""
    cmd = [sys.executable, "-m", "omni2.clients.cli", "generate", "--checkpoint", str(tiny_checkpoint),
           "--text", "hi", "--max-steps", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("4 steps (max_steps); text: ") and done.stdout.rstrip().endswith("wav: none (no --wav)")
