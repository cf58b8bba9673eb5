"""The server tests' fake engine is the shipped null engine (streaming/engine/null_engine.py)."""
from omni2.streaming.engine.null_engine import EngineFull, NullEngine as FakeEngine  # noqa: F401
