"""Python's cyclic garbage collector and the engine's deadlines.

A collection holds the GIL, so while it runs every engine thread (step, encoder, vocoder) and
every caller waits. A generation-2 ("full") collection walks every object the collector tracks,
and with torch, transformers and whisper imported and a model loaded that is ~3.3e5 objects that
live as long as the process: measured on the 2-core machine (tiny model) a full collection took
156-305 ms, longer than the 200 ms jitter buffer `omni2 bench arrivals` plays with; a busy
server runs one every few minutes (tests/test_server_memory.py). In `bench arrivals` (8
sessions, 8 turns/s) one fell on the measured turns: 227 ms inside the slowest tenth's
first-audio waits, p99 420 ms against 163 at p50, the probe not held (s15-16). Generations 0
and 1 cost 0.2 and 2 ms and never mattered.

So the engine moves what exists when it starts (the loaded model, the imported libraries) to
the collector's permanent generation: a full collection then walks only what came after it
(measured: 0.0 ms right after the freeze). A gateway process of the multi-process server
(server/workers/processes.py: torch, the "stop omni" recognizer, the app; ~2e5 objects, no
model) does the same before it serves: a full collection there held its event loop, and with it
every session's listening and audio pacing, for 57-97 ms (0.0 ms after the freeze).
"""
from __future__ import annotations

import atexit
import gc


def freeze_long_lived() -> int:
    """Collect once, then exempt every object alive now from all later collections (gc.freeze).
    Call it once the model and the engine are built: what it freezes is never collected, so
    garbage that exists at the call is collected first. Returns the objects frozen in all.

    At exit the frozen objects go back to the collector (gc.unfreeze), so the interpreter's
    last collections finalize them as usual: frozen, they would outlive it, and native
    extensions then report them as leaks (nanobind printed ~600 lines of "leaked" triton
    objects at the end of `omni2 bench arrivals`)."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)   # once, however often a process freezes
    atexit.register(gc.unfreeze)
    return gc.get_freeze_count()
