"""streaming/settings.py: the one place streaming/ reads its OMNI2_* switches."""
from __future__ import annotations

import ast
from pathlib import Path

from omni2.streaming.engine.config import DEFAULT_MAX_STEPS, EngineConfig
from omni2.streaming.engine.messages import TurnRequest
from omni2.streaming.settings import Switches

STREAMING = Path(__file__).resolve().parent.parent / "streaming"


def omni2_environment_reads(source: str) -> list[str]:
    """The OMNI2_* names a module's code reads from os.environ (a literal name or subscript)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            target, key = node.func.value, node.args[0]
        elif isinstance(node, ast.Subscript):
            target, key = node.value, node.slice
        else:
            continue
        if (ast.unparse(target) in ("os.environ", "environ") and isinstance(key, ast.Constant)
                and str(key.value).startswith("OMNI2_")):
            found.append(key.value)
    return found


def test_no_module_of_streaming_reads_an_omni2_switch_but_settings():
    reads = {p.relative_to(STREAMING).as_posix(): names for p in sorted(STREAMING.rglob("*.py"))
             if p.name != "settings.py" and (names := omni2_environment_reads(p.read_text()))}
    assert reads == {}
    # (the check itself finds both forms)
    assert omni2_environment_reads('import os\nos.environ.get("OMNI2_X", "1")\nos.environ["OMNI2_Y"]') == ["OMNI2_X", "OMNI2_Y"]


def test_switches_read_from_the_environment():
    s = Switches.read({"OMNI2_CACHE": "/c", "OMNI2_FEW_ROWS": "0", "OMNI2_CPU_DISABLE": "bf16"})
    assert str(s.cache) == "/c" and s.checkpoint is None and s.cpu_disable == "bf16"
    assert s.off("OMNI2_FEW_ROWS") and not s.few_rows and s.vnni and not s.off("OMNI2_HUGE_PAGES")


def test_one_default_for_an_answers_steps():
    from omni2.server.settings import ServerSettings

    assert EngineConfig().max_steps == TurnRequest("s").max_steps == ServerSettings().max_steps == DEFAULT_MAX_STEPS
