"""The most recent samples of a stream, appended in place.

A listener keeps the last few seconds of microphone audio (the echo canceller for its delay
search, the duplex controller for command windows). Growing a numpy array with
`np.concatenate` on every packet copies everything kept each time: per 100 ms packet,
hundreds of kB per session, cold in cache on a loaded host. Here the samples are written
into a preallocated array; once it holds more than twice `keep`, the last `keep` move to the
front (one copy per `keep` samples appended). What is kept, and when it is let go, is what
the concatenating code kept: `data` holds the same samples from the same `base`.
"""
from __future__ import annotations

import numpy as np


class RecentSamples:
    def __init__(self, keep: int, dtype=np.float32):
        self.keep = int(keep)
        self._buf = np.zeros(2 * self.keep + 4096, dtype=dtype)
        self._n = 0
        self.base = 0          # absolute index of data[0]

    @property
    def data(self) -> np.ndarray:
        """The kept samples (a view: valid until the next append)."""
        return self._buf[: self._n]

    @property
    def size(self) -> int:
        return self._n

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=self._buf.dtype).reshape(-1)
        end = self._n + x.size
        if end > self._buf.size:
            grown = np.zeros(max(2 * self._buf.size, end), dtype=self._buf.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : end] = x
        self._n = end
        if self._n > 2 * self.keep:
            drop = self._n - self.keep
            self._buf[: self.keep] = self._buf[drop : self._n].copy()
            self._n = self.keep
            self.base += drop
