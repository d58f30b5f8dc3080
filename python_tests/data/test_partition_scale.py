"""partition_dirichlet at scale: when rejection sampling finds no draw giving every client
``min_size`` samples (many clients, small alpha), the split is topped up by construction; every
request the previous implementation answered still gets the bit-identical partition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oqfl_ext.data import partition_dirichlet

FMNIST_LIKE = np.repeat(np.arange(10), 6000)  # 60000 labels, 6000 per class


def old_partition_dirichlet(labels, num_clients, alpha, seed=0, min_size=1, max_tries=1000):
    """The implementation before the constructive fallback (the reference for reproducibility:
    its outputs are what existing experiments and checkpoints were made with)."""
    yn = np.asarray(labels)
    k = num_clients
    rng = np.random.default_rng(int(seed))
    by_class = [np.flatnonzero(yn == c) for c in np.unique(yn)]
    for _ in range(max_tries):
        buckets = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, float(alpha)))
            if not np.all(np.isfinite(p)) or p.sum() <= 0:
                p = np.zeros(k)
                p[rng.integers(k)] = 1.0
            cuts = np.round(np.cumsum(p) / p.sum() * idx.size).astype(np.int64)
            cuts[-1] = idx.size
            for c, chunk in enumerate(np.split(idx, np.maximum.accumulate(cuts[:-1]))):
                buckets[c].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(p.size for p in parts) >= min_size:
            return [np.sort(p.astype(np.int64)) for p in parts]
    return None  # the old code raised ValueError("no draw in ...")


def assert_partition(parts, n, k):
    assert len(parts) == k and all(p.dtype == torch.int64 and p.dim() == 1 for p in parts)
    allidx = torch.cat(parts)
    assert allidx.numel() == n and torch.equal(torch.sort(allidx)[0], torch.arange(n))


UNBALANCED = np.concatenate([np.full(n, c) for c, n in enumerate((50, 300, 7, 1000, 120))])
SMALL = np.arange(600) % 10


@pytest.mark.parametrize("labels,k,alpha,seed,min_size,max_tries", [
    (SMALL, 10, 0.5, 0, 1, 1000),
    (SMALL, 10, 0.1, 3, 1, 1000),
    (SMALL, 20, 0.3, 4, 15, 1000),       # accepts a draw after more than 30 rejected ones
    (SMALL, 10, 0.2, 1, 20, 1000),       # the second draw
    (SMALL, 1, 0.1, 0, 1, 1000),
    (UNBALANCED, 7, 0.05, 2, 5, 1000),   # after more than 10 rejected draws
    (UNBALANCED, 3, 1e-4, 1, 0, 1000),   # the Dirichlet draw may underflow
    (FMNIST_LIKE, 100, 0.1, 0, 1, 1000),
    (FMNIST_LIKE, 10, 1000.0, 5, 10, 1000),
])
def test_accepted_draws_are_bit_identical_to_the_old_implementation(labels, k, alpha, seed,
                                                                    min_size, max_tries):
    want = old_partition_dirichlet(labels, k, alpha, seed, min_size, max_tries)
    assert want is not None  # a setting the old code answered
    got = partition_dirichlet(labels, k, alpha, seed=seed, min_size=min_size,
                              max_tries=max_tries)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, torch.from_numpy(w))


def _top_share(labels, parts):
    y = torch.from_numpy(labels)
    return [torch.bincount(y[p], minlength=10).max().item() / p.numel() for p in parts]


def test_1000_clients_alpha_0_1_get_their_minimum():
    # the old code found no draw (clients left empty in every one of its 1000 draws)
    assert old_partition_dirichlet(FMNIST_LIKE, 1000, 0.1, 0, 1, max_tries=20) is None
    for min_size in (1, 30):
        parts = partition_dirichlet(FMNIST_LIKE, 1000, 0.1, seed=0, min_size=min_size)
        assert_partition(parts, FMNIST_LIKE.size, 1000)
        assert min(p.numel() for p in parts) >= min_size
        again = partition_dirichlet(FMNIST_LIKE, 1000, 0.1, seed=0, min_size=min_size)
        assert all(torch.equal(a, b) for a, b in zip(parts, again))
        other = partition_dirichlet(FMNIST_LIKE, 1000, 0.1, seed=1, min_size=min_size)
        assert not all(torch.equal(a, b) for a, b in zip(parts, other))
        # still label-skewed: an IID split gives every client about 10% of each class
        assert np.median(_top_share(FMNIST_LIKE, parts)) > 0.5


@pytest.mark.parametrize("labels,k,min_size", [
    (SMALL, 60, 10),              # num_clients * min_size == the number of samples
    (SMALL, 600, 1),              # one sample per client
    (UNBALANCED, 40, 36),         # 1440 of 1477 samples must be spread evenly
])
def test_tight_minimum_is_met_by_construction(labels, k, min_size):
    assert old_partition_dirichlet(labels, k, 0.01, 0, min_size, max_tries=3) is None
    parts = partition_dirichlet(labels, k, 0.01, seed=0, min_size=min_size, max_tries=3)
    assert_partition(parts, labels.size, k)
    assert min(p.numel() for p in parts) >= min_size


def test_top_up_moves_majority_class_samples_from_the_largest_clients():
    # with max_tries=1 the only draw is topped up; the old code with min_size=0 gives that draw
    raw = [set(p.tolist()) for p in old_partition_dirichlet(SMALL, 30, 0.01, 2, 0, 1)]
    parts = [set(p.tolist()) for p in
             partition_dirichlet(SMALL, 30, 0.01, seed=2, min_size=5, max_tries=1)]
    short = [c for c, r in enumerate(raw) if len(r) < 5]
    assert short  # the draw left clients short
    moved = set()
    for c, (r, p) in enumerate(zip(raw, parts)):
        if c in short:
            assert r <= p and len(p) == 5  # kept its own samples, got exactly what it lacked
            moved |= p - r
        else:
            assert p <= r and len(p) >= 5
    assert len(moved) == sum(5 - len(raw[c]) for c in short)
    # the samples came from the largest clients, first from the class each has most of ...
    donors = {c for c, (r, p) in enumerate(zip(raw, parts)) if p < r}
    largest = sorted(range(30), key=lambda c: len(raw[c]))[-len(donors) - 2:]
    assert donors and donors <= set(largest)
    for d in donors:
        counts = np.bincount(SMALL[sorted(raw[d])], minlength=10)
        assert int(counts.argmax()) in set(SMALL[sorted(raw[d] - parts[d])].tolist())
    # ... so a client the draw left empty holds a single class, as the draw's clients mostly do
    empty = [c for c in short if not raw[c]]
    assert empty and all(len(set(SMALL[sorted(parts[c])].tolist())) == 1 for c in empty)


@pytest.mark.parametrize("k,min_size", [(1000, 61), (60001, 1)])
def test_impossible_minimum_is_a_one_line_value_error(k, min_size):
    with pytest.raises(ValueError, match=r"min_size|num_clients") as info:
        partition_dirichlet(FMNIST_LIKE, k, 0.1, seed=0, min_size=min_size)
    assert "\n" not in str(info.value) and "expected" in str(info.value)
