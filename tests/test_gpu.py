"""GPU checks (skipped without CUDA): the engine on the device, in fp32 and bf16, compiled."""
import numpy as np
import pytest
import torch

from omni2.model.generate import generate
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine
from omni2.streaming.engine.messages import TurnDone, TurnRequest

pytestmark = pytest.mark.gpu


def _question(seed):
    return (0.1 * np.random.RandomState(seed).randn(12000)).astype(np.float32)


def _run(model, cfg, audio, steps):
    with Engine(model, cfg) as eng:
        sid = eng.open_session()
        turn = eng.submit(TurnRequest(session_id=sid, audio_16k=audio, max_steps=steps))
        return [e for e in turn.events(timeout=600) if isinstance(e, TurnDone)][0]


@pytest.fixture(scope="module")
def cuda_model(tiny_checkpoint):
    from omni2.model.bundle import load_model

    return load_model(tiny_checkpoint, device="cuda")


def test_fp32_on_cuda_matches_the_cuda_reference(cuda_model):
    prompt, embeds = cuda_model.encode_question(_question(0))
    ref = generate(cuda_model.lm, prompt, embeds, 24)
    done = _run(cuda_model, EngineConfig(max_sessions=4, record_tokens=True), _question(0), 24)
    assert done.stats["audio_ids"] == ref.audio_tokens


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_on_cuda_keeps_tokens(cuda_model, mode):
    plain = _run(cuda_model, EngineConfig(max_sessions=4, record_tokens=True), _question(1), 24)
    compiled = _run(cuda_model, EngineConfig(max_sessions=4, record_tokens=True, compile=mode), _question(1), 24)
    assert compiled.stats["audio_ids"] == plain.stats["audio_ids"]


def test_bf16_engine_runs_and_streams(tiny_checkpoint):
    from omni2.model.bundle import load_model

    model = load_model(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    done = _run(model, EngineConfig(max_sessions=2, record_tokens=True), _question(2), 24)
    assert done.reason == "max_steps" and done.frames_emitted == done.frames_generated > 0
