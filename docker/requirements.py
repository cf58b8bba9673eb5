"""The image's requirement lists, read from pyproject.toml (mounted into the build, not copied).

    python requirements.py pyproject.toml whisper   the openai-whisper requirement, for pip --no-deps
    python requirements.py pyproject.toml rest      everything else, one requirement a line

The dependencies get their own layer built from pyproject.toml alone, so a code edit does not
reinstall them; the build backend is in that list too, so the code layer builds offline.

openai-whisper is installed with --no-deps first and its own requirements are listed here in
its place, less triton: its metadata asks for triton (~1 GB) on every Linux x86-64 host, for
GPU word-timing kernels omni2 never calls. triton stays where the installed torch requires it
itself (torch's CUDA wheels do, for torch.compile on a GPU); a CPU torch leaves it out.
Standard library only, any Python the image has (tomllib from 3.11, else pip's own tomli).
"""
from __future__ import annotations

import importlib.metadata as metadata
import re
import sys

try:
    import tomllib
except ImportError:                     # Python 3.10 (an Ubuntu 22.04 base)
    from pip._vendor import tomli as tomllib

WHISPER = "openai-whisper"
OPTIONAL_GPU_ONLY = {"triton"}


def name_of(requirement: str) -> str:
    """The normalised project name of a requirement line (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def installed_requires(dist: str) -> list[str]:
    """A distribution's requirements, less those of its extras."""
    return [r for r in metadata.requires(dist) or [] if not re.search(r"\bextra\s*==", r)]


def whisper_requirement(project: dict) -> str:
    (line,) = [r for r in project["project"]["dependencies"] if name_of(r) == WHISPER]
    return line


def rest(project: dict) -> list[str]:
    torch_needs = {name_of(r) for r in installed_requires("torch")}
    dropped = OPTIONAL_GPU_ONLY - torch_needs
    out = list(project["build-system"]["requires"])
    for line in project["project"]["dependencies"]:
        if name_of(line) != WHISPER:
            out.append(line)
    for line in installed_requires(WHISPER):
        if name_of(line) not in dropped:
            out.append(line)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[2] not in ("whisper", "rest"):
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], "rb") as f:
        project = tomllib.load(f)
    lines = [whisper_requirement(project)] if argv[2] == "whisper" else rest(project)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
