"""What the supervisor hands each child process (kept apart so neither imports the other).

The resolved settings travel as JSON in OMNI2_WORKER_SETTINGS, so each process serves exactly
what the parent validated; the supervisor's pid in OMNI2_SUPERVISOR_PID. Exit codes say why
a child ended.
"""
from __future__ import annotations

import dataclasses
import json
import os

from ..settings import ServerSettings

SETTINGS_ENV = "OMNI2_WORKER_SETTINGS"
SUPERVISOR_ENV = "OMNI2_SUPERVISOR_PID"
EXIT_MODEL_FAILED = 3           # the engine cannot load a model the operator named: do not restart
EXIT_GATEWAY_FAILED = 70        # a gateway hit a fatal error (its sessions were closed with 1011)


def settings_to_env(settings: ServerSettings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def settings_from_env() -> ServerSettings:
    raw = json.loads(os.environ[SETTINGS_ENV])
    return ServerSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
