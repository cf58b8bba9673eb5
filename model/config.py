"""Language-model hyper-parameters and their presets.

Dimensions of a checkpoint come from its own `model_config.yaml` (litgpt-style keys), so any
checkpoint in the released layout loads; the presets exist for tests and for writing one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import tokens


class ConfigError(ValueError):
    """A model_config.yaml that this implementation cannot run faithfully."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mini-omni2"
    n_layer: int = 24
    n_embd: int = 896
    n_head: int = 14
    n_query_groups: int = 2
    head_size: int = 64
    intermediate_size: int = 4864
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    block_size: int = 2048
    padded_vocab_size: int = tokens.TOTAL_VOCAB
    text_vocab_size: int = tokens.PADDED_TEXT_VOCAB
    audio_vocab_size: int = tokens.PADDED_AUDIO_VOCAB
    whisper_adapter_dim: int = 768
    vision_adapter_dim: int = 512
    # Text-stream ids that mean "the user asked me to stop" (paper, stage 3). The released
    # checkpoint defines none; a checkpoint that does lists them in model_config.yaml and the
    # engine then ends the answer when the model writes one.
    interrupt_token_ids: tuple = ()

    def __post_init__(self) -> None:
        if self.n_head % self.n_query_groups:
            raise ConfigError(f"n_head {self.n_head} is not a multiple of n_query_groups {self.n_query_groups}")
        if self.head_size % 2:
            raise ConfigError(f"head_size {self.head_size} must be even for rotary embeddings")
        expect = self.text_vocab_size + tokens.N_AUDIO_LAYERS * self.audio_vocab_size
        if self.padded_vocab_size != expect:
            raise ConfigError(
                f"padded_vocab_size {self.padded_vocab_size} != text {self.text_vocab_size} + 7 x audio "
                f"{self.audio_vocab_size} = {expect}"
            )
        if self.text_vocab_size != tokens.PADDED_TEXT_VOCAB or self.audio_vocab_size != tokens.PADDED_AUDIO_VOCAB:
            raise ConfigError("token spaces differ from Mini-Omni2's (152000 text + 7 x 4160 audio rows)")

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    @property
    def qkv_rows(self) -> int:
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    # ---- litgpt-style yaml -------------------------------------------------------------
    # Keys whose value must be exactly this for the architecture implemented in lm.py.
    _FIXED = {
        "rotary_percentage": 1.0,
        "parallel_residual": False,
        "bias": False,
        "add_qkv_bias": True,
        "lm_head_bias": False,
        "norm_class_name": "RMSNorm",
        "mlp_class_name": "LLaMAMLP",
        "post_adapter": False,
        "asr_adapter": "llamamlp",
        "scale_embeddings": False,
    }

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot parse model config: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of litgpt config keys")
        for key, want in cls._FIXED.items():
            if key in raw and raw[key] != want:
                raise ConfigError(f"{path}: {key}={raw[key]!r} is not supported (Mini-Omni2 uses {want!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: raw[k] for k in fields if k in raw}
        if "interrupt_token_ids" in kwargs:
            kwargs["interrupt_token_ids"] = tuple(int(i) for i in kwargs["interrupt_token_ids"] or ())
        if "head_size" not in raw and "n_embd" in raw and "n_head" in raw:
            kwargs["head_size"] = raw["n_embd"] // raw["n_head"]
        if raw.get("n_query_groups") is None and "n_head" in raw:
            kwargs["n_query_groups"] = raw["n_head"]
        missing = [k for k in ("n_layer", "n_embd", "n_head", "intermediate_size") if k not in raw]
        if missing:
            raise ConfigError(f"{path}: missing required keys {missing}")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_yaml_dict(self) -> dict:
        out = dataclasses.asdict(self)
        ids = out.pop("interrupt_token_ids")
        if ids:  # omitted when empty, so a released-style file stays as released
            out["interrupt_token_ids"] = list(ids)
        out.update(self._FIXED)
        out.update(
            vocab_size=self.padded_vocab_size,
            cat_audio_vocab_size=tokens.N_AUDIO_LAYERS * self.audio_vocab_size,
            tie_word_embeddings=True,
            rope_condense_ratio=1,
            shared_attention_norm=False,
        )
        return out


PRESETS: dict[str, ModelConfig] = {
    "mini-omni2": ModelConfig(),
    # Same token spaces and special ids, width/depth small enough for CI (the 181,120-row
    # embedding and head dominate its size: 2 x 181120 x 32 floats ~ 46 MB).
    "tiny": ModelConfig(
        name="tiny",
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_query_groups=2,
        head_size=8,
        intermediate_size=64,
        whisper_adapter_dim=32,
        vision_adapter_dim=16,
    ),
}
