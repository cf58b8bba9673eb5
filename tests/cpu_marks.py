"""Skip marks for tests of a CPU fast path, with cpu_features' own reason (the same check the
runtime makes, so the switches that emulate a smaller CPU skip the same tests)."""
from __future__ import annotations

import pytest

from omni2.streaming.cpu import features as cpu_features


def needs(*features: str) -> pytest.MarkDecorator:
    reasons = [reason for feature in features if (reason := cpu_features.missing(feature)) is not None]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "(available)")


def isa_emulated() -> bool:
    """torch runs below what the CPU has (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU)."""
    import torch

    return "avx512f" in cpu_features.cpu_flags() and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


# torch.compile's CPU code generation mixes the two views of the CPU when they disagree: with
# ATEN_CPU_CAPABILITY=avx2 on this project's AVX-512 machine, inductor's decode step gave wrong
# tokens (aot_eager and inductor at 256-bit vectors without the switch were right), so the
# emulated run cannot speak for a real AVX2 CPU there.
not_under_isa_emulation = pytest.mark.skipif(
    isa_emulated(), reason="torch.compile's CPU codegen is inconsistent under ATEN_CPU_CAPABILITY emulation")
