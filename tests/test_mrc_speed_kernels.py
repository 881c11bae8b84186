"""sim.mrc: the specialised sequential LRU kernels (one per size class of keys) equal the Fenwick reference."""

from __future__ import annotations

import numpy as np
import pytest

from sim import mrc

pytestmark = pytest.mark.skipif(not mrc.HAVE_NUMBA, reason="compiled kernels need numba")


@pytest.mark.parametrize("n_ids", [1, 7, 600, 1024, 1025, 3000, 8192])
def test_sequential_kernel_size_classes(n_ids):
    # every size class and its edges; long enough to compact several times (slots = 2 to 4 per key); skewed keys
    # (long reuse distances next to short ones) and a permutation first (every key live at once)
    rng = np.random.default_rng(n_ids)
    n = 9 * n_ids + 2000
    ids = np.r_[rng.permutation(n_ids), rng.zipf(1.2, n - n_ids) % n_ids].astype(np.int64)
    one = (np.zeros(n, np.int64), np.ones(1, np.int64))
    ref = mrc.lru_hit_capacity_py(ids, *one, n_ids)
    assert mrc.lru_hit_capacity(ids, *one, n_ids).tolist() == ref.tolist()
    a, b = np.divmod(ids, 5)  # key = a * 5 + b
    cum = mrc.lru_hit_counts(a.astype(np.int32), b.astype(np.int32), 5, n_ids + 5)
    assert cum.tolist() == mrc.lru_hit_counts_py(a, b, 5, n_ids + 5).tolist()


def test_sequential_kernel_repeats_and_empty():
    # the same key twice in a row (the next lookup's slot is the one just taken), and no lookups at all
    ids = np.array([3, 3, 3, 1, 3, 1, 1, 0, 3], np.int64)
    one = (np.zeros(len(ids), np.int64), np.ones(1, np.int64))
    assert mrc.lru_hit_capacity(ids, *one, 4).tolist() == mrc.lru_hit_capacity_py(ids, *one, 4).tolist()
    empty = np.zeros(0, np.int64)
    assert mrc.lru_hit_counts(empty, empty, 1, 4).tolist() == [0]
