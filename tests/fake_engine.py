"""The server tests' fake engine is the shipped null engine (streaming/engine/null_engine.py)."""
from omni2.streaming.engine.null_engine import SAMPLE_RATE, EngineFull, NullEngine as FakeEngine  # noqa: F401
