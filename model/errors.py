"""Errors shared by the checkpoint loaders in omni2.model."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded faithfully.

    The message always names the file, and the offending key where there is one, so a
    user with a wrong or damaged download sees what to replace without reading a traceback.
    """


def check_state_dict(
    path: object, got: dict, want: dict, *, what: str = "checkpoint"
) -> None:
    """Compare a loaded state dict against the shapes a module expects.

    `got` and `want` map key -> tensor (or anything with `.shape`). Raises CheckpointError
    naming the first missing, unexpected or mis-shaped key (all of them, when several).
    """
    missing = sorted(k for k in want if k not in got)
    extra = sorted(k for k in got if k not in want)
    if missing:
        raise CheckpointError(f"{path}: {what} is missing key(s) {_few(missing)}")
    if extra:
        raise CheckpointError(f"{path}: {what} has unexpected key(s) {_few(extra)}")
    not_tensor = [k for k in want if not hasattr(got[k], "shape")]
    if not_tensor:
        raise CheckpointError(f"{path}: {what} key {not_tensor[0]} is not a tensor ({type(got[not_tensor[0]]).__name__})")
    bad = [
        f"{k} has shape {list(got[k].shape)}, expected {list(want[k].shape)}"
        for k in want
        if tuple(got[k].shape) != tuple(want[k].shape)
    ]
    if bad:
        raise CheckpointError(f"{path}: {what} key {'; '.join(bad[:5])}")


def _few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")
