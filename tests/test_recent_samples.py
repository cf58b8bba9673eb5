"""RecentSamples keeps exactly what growing an array by concatenation kept."""
import numpy as np

from omni2.streaming.listening.recent import RecentSamples


def test_recent_samples_keep_the_same_samples_as_concatenation():
    rng = np.random.default_rng(3)
    keep = 1000
    recent = RecentSamples(keep)
    ref, ref_base = np.zeros(0, np.float32), 0
    for _ in range(400):
        x = rng.standard_normal(int(rng.integers(0, 700))).astype(np.float32)
        recent.append(x)
        ref = np.concatenate([ref, x])
        if ref.size > 2 * keep:
            drop = ref.size - keep
            ref, ref_base = ref[drop:], ref_base + drop
        assert recent.base == ref_base and recent.size == ref.size
        np.testing.assert_array_equal(recent.data, ref)


def test_recent_samples_take_an_append_larger_than_the_buffer():
    recent = RecentSamples(10)
    x = np.arange(5000, dtype=np.float32)
    recent.append(x)
    assert recent.base == 5000 - 10 and recent.size == 10
    np.testing.assert_array_equal(recent.data, x[-10:])
