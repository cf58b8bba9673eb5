"""Skip marks for tests of a CPU fast path, with cpu_features' own reason (the same check the
runtime makes, so the switches that emulate a smaller CPU skip the same tests)."""
from __future__ import annotations

import pytest

from omni2.streaming import cpu_features


def needs(*features: str) -> pytest.MarkDecorator:
    reasons = [reason for feature in features if (reason := cpu_features.missing(feature)) is not None]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "(available)")
