"""Every OMNI2_* switch that streaming/ reads, in one object (the server's own settings are
server/settings.py). `switches()` reads the environment on each call: tests, and the runs
that emulate a smaller CPU, set these per run, and a read costs next to nothing."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional


@dataclass(frozen=True)
class Switches:
    cache: Path                    # OMNI2_CACHE: what omni2 generates or builds (~/.cache/omni2)
    checkpoint: Optional[str]      # OMNI2_CHECKPOINT: the checkpoint `--model auto` tries first
    command_model: Optional[str]   # OMNI2_COMMAND_MODEL: the "stop omni" recognizer's model dir
    cpu_disable: str               # OMNI2_CPU_DISABLE: CPU features to take away (cpu/features.py)
    few_rows: bool                 # OMNI2_FEW_ROWS=0: no few_rows kernel (cpu/few_rows.py)
    decode_attention: bool         # OMNI2_DECODE_ATTENTION=0: no fused decode attention
    vnni: bool                     # OMNI2_VNNI=0: no int8 x int8 head screen
    huge_pages: bool               # OMNI2_HUGE_PAGES=0: no 2 MiB pages for big CPU tensors

    @classmethod
    def read(cls, env: Mapping[str, str] = os.environ) -> "Switches":
        def on(name: str) -> bool:
            return env.get(name, "1") != "0"

        return cls(cache=Path(env.get("OMNI2_CACHE", Path.home() / ".cache" / "omni2")),
                   checkpoint=env.get("OMNI2_CHECKPOINT") or None,
                   command_model=env.get("OMNI2_COMMAND_MODEL") or None,
                   cpu_disable=env.get("OMNI2_CPU_DISABLE", ""),
                   few_rows=on("OMNI2_FEW_ROWS"), decode_attention=on("OMNI2_DECODE_ATTENTION"),
                   vnni=on("OMNI2_VNNI"), huge_pages=on("OMNI2_HUGE_PAGES"))

    def off(self, variable: str) -> bool:
        """Whether the on/off switch `variable` (e.g. "OMNI2_FEW_ROWS") is set to 0."""
        return not getattr(self, variable.removeprefix("OMNI2_").lower())


def switches() -> Switches:
    return Switches.read()
