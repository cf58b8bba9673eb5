"""Packed weights on 2 MiB pages (streaming/cpu/huge_pages.py): same values, huge pages where the
system grants them, memory returned when the tensor goes, plain tensors elsewhere."""
from __future__ import annotations

import gc

import pytest
import torch

from omni2.streaming.cpu import huge_pages

from cpu_marks import needs  # noqa: E402

needs_thp = needs("huge_pages")


def mapping_of(address: int) -> dict | None:
    """The /proc/self/smaps entry (start, end, AnonHugePages kB) of the mapping holding address."""
    entry = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                entry = {"start": start, "end": end} if start <= address < end else None
            elif entry is not None and line.startswith("AnonHugePages:"):
                entry["huge_kb"] = int(line.split()[1])
                return entry
    return None


@needs_thp
def test_a_big_tensor_lies_on_huge_pages_and_its_memory_goes_with_it():
    t = huge_pages.empty((8192, 2048), torch.float32)  # 64 MiB
    assert t.shape == (8192, 2048) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0
    t.fill_(1.5)  # touch every page
    entry = mapping_of(t.data_ptr())
    assert entry is not None and entry["huge_kb"] >= 32 * 1024, entry  # most of it on 2 MiB pages
    assert float(t.sum()) == 1.5 * t.numel()
    address = t.data_ptr()
    del t
    gc.collect()
    assert mapping_of(address) is None  # unmapped


def test_small_tensors_and_the_switch_keep_torchs_allocator(monkeypatch):
    small = huge_pages.empty((100, 100), torch.float32)
    assert small.untyped_storage().nbytes() == 100 * 100 * 4  # not a view into a bigger mapping
    monkeypatch.setenv("OMNI2_HUGE_PAGES", "0")
    huge_pages.available.cache_clear()
    try:
        assert not huge_pages.available()
        big = huge_pages.empty((8192, 2048), torch.float32)
        assert big.untyped_storage().nbytes() == 8192 * 2048 * 4
    finally:
        huge_pages.available.cache_clear()


@needs_thp
def test_the_engines_kv_cache_is_zeroed_on_huge_pages(tiny_model):
    from omni2.streaming.engine.config import EngineConfig
    from omni2.streaming.engine.engine import Engine

    eng = Engine(tiny_model, EngineConfig(max_sessions=4))  # 8 rows of the tiny model: > 2 MiB
    for t in (eng.cache.k, eng.cache.v):
        assert t.untyped_storage().nbytes() >= huge_pages.HUGE_PAGE
        assert t.data_ptr() % huge_pages.HUGE_PAGE == 0 and not bool(t.any())
