"""Client data partitioners (oqfl_ext.data.partition)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oqfl_ext.data import partition_dirichlet, partition_iid, partition_shards, partition_stats

LABELS = torch.arange(6000) % 10                       # 10 balanced classes
UNBALANCED = torch.cat([torch.full((n,), c) for c, n in enumerate((50, 300, 7, 1000, 120))])

PARTITIONERS = {
    "iid": lambda y, k, seed: partition_iid(y, k, seed),
    "dirichlet": lambda y, k, seed: partition_dirichlet(y, k, 0.3, seed),
    "shards": lambda y, k, seed: partition_shards(y, k, 2, seed),
}


def assert_partition(parts, n, k):
    assert len(parts) == k
    for p in parts:
        assert p.dtype == torch.int64 and p.dim() == 1
    allidx = torch.cat(parts)
    assert allidx.numel() == n                           # disjoint ...
    assert torch.equal(torch.sort(allidx)[0], torch.arange(n))  # ... and covering


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@pytest.mark.parametrize("labels", [LABELS, UNBALANCED], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_disjoint_covering_reproducible(name, labels, k):
    f = PARTITIONERS[name]
    a = f(labels, k, 0)
    assert_partition(a, labels.numel(), k)
    b = f(labels, k, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    if k > 1:
        c = f(labels, k, 1)
        assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    for f in PARTITIONERS.values():
        f(LABELS, 5, 3)
    assert torch.equal(state, torch.get_rng_state())
    assert np.array_equal(np_state, np.random.get_state()[1])


def test_inputs_accepted_as_numpy_and_list():
    a = partition_iid(LABELS, 4, seed=2)
    b = partition_iid(LABELS.numpy().astype(np.uint8), 4, seed=2)
    c = partition_iid(LABELS.tolist(), 4, seed=2)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


def test_iid_sizes_balanced():
    parts = partition_iid(torch.zeros(1003, dtype=torch.int64), 10, seed=0)
    assert {p.numel() for p in parts} == {100, 101}


def _histograms(labels, parts, n_classes=10):
    return torch.stack([torch.bincount(labels[p], minlength=n_classes) for p in parts]).double()


def _skew(labels, parts):
    """Mean total-variation distance between each client's label distribution and the
    global one (0 for identical distributions, at most 1)."""
    h = _histograms(labels, parts)
    p = h / h.sum(1, keepdim=True)
    g = torch.bincount(labels, minlength=10).double()
    g = g / g.sum()
    return (0.5 * (p - g).abs().sum(1)).mean().item()


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
    iid = _skew(LABELS, partition_iid(LABELS, 10, seed=0))
    small = _skew(LABELS, partition_dirichlet(LABELS, 10, alpha=0.1, seed=0))
    large = _skew(LABELS, partition_dirichlet(LABELS, 10, alpha=1000.0, seed=0))
    assert iid < 0.05 and large < 0.05
    assert small > 0.5
    # with alpha = 0.1 most clients are dominated by a few classes
    h = _histograms(LABELS, partition_dirichlet(LABELS, 10, alpha=0.1, seed=0))
    top2 = h.sort(1, descending=True)[0][:, :2].sum(1) / h.sum(1)
    assert (top2 > 0.6).float().mean().item() >= 0.5


def test_dirichlet_min_size():
    parts = partition_dirichlet(LABELS, 20, alpha=0.3, seed=4, min_size=50)
    assert min(p.numel() for p in parts) >= 50
    assert_partition(parts, LABELS.numel(), 20)
    with pytest.raises(ValueError, match="min_size"):
        partition_dirichlet(LABELS[:100], 20, alpha=0.5, seed=0, min_size=6)
    # no draw meets min_size exactly when min_size * num_clients == the number of samples: the
    # split is topped up by construction (python_tests/data/test_partition_scale.py tests more)
    parts = partition_dirichlet(LABELS[:100], 10, alpha=0.01, seed=0, min_size=10, max_tries=3)
    assert_partition(parts, 100, 10)
    assert [p.numel() for p in parts] == [10] * 10


@pytest.mark.parametrize("k,m", [(10, 2), (5, 2), (20, 3), (100, 2), (10, 1), (2, 10)])
def test_shards_exactly_k_classes_when_divisible(k, m):
    parts = partition_shards(LABELS, k, m, seed=7)
    assert_partition(parts, LABELS.numel(), k)
    for p in parts:
        assert torch.unique(LABELS[p]).numel() == m
        assert p.numel() == LABELS.numel() // k


def test_shards_vary_class_pairs_with_seed():
    combos = {tuple(sorted(torch.unique(LABELS[p]).tolist()))
              for s in range(5) for p in partition_shards(LABELS, 10, 2, seed=s)}
    assert len(combos) > 10


def test_stats_table():
    parts = partition_shards(LABELS, 4, 2, seed=0)
    table = partition_stats(LABELS, parts)
    lines = table.splitlines()
    assert len(lines) == 1 + 4 + 1
    assert lines[0].split()[:3] == ["client", "samples", "classes"]
    assert lines[0].split()[3:] == [str(c) for c in range(10)]
    for i, p in enumerate(parts):
        cells = lines[1 + i].split()
        assert cells[0] == str(i) and int(cells[1]) == p.numel()
        hist = torch.bincount(LABELS[p], minlength=10).tolist()
        assert [int(c) for c in cells[3:]] == hist
        assert int(cells[2]) == sum(1 for v in hist if v)
    assert lines[-1].split()[:2] == ["total", str(LABELS.numel())]


@pytest.mark.parametrize("call,match", [
    (lambda: partition_iid(LABELS, 0, 0), "num_clients"),
    (lambda: partition_iid(LABELS, -1, 0), "num_clients"),
    (lambda: partition_iid(LABELS, 2.5, 0), "num_clients"),
    (lambda: partition_iid(LABELS, True, 0), "num_clients"),
    (lambda: partition_iid(LABELS[:5], 6, 0), "exceeds"),
    (lambda: partition_iid(LABELS, 2, "x"), "seed"),
    (lambda: partition_dirichlet(LABELS, 2, 0.5, -1), "seed"),
    (lambda: partition_shards(LABELS, 2, 2, 2 ** 64), "seed"),
    (lambda: partition_iid(torch.zeros(4, 2, dtype=torch.int64), 2, 0), "1-D"),
    (lambda: partition_iid(torch.rand(10), 2, 0), "integer"),
    (lambda: partition_iid(torch.tensor([0, -1, 2]), 2, 0), ">= 0"),
    (lambda: partition_dirichlet(LABELS, 4, 0.0, 0), "alpha"),
    (lambda: partition_dirichlet(LABELS, 4, -1.0, 0), "alpha"),
    (lambda: partition_dirichlet(LABELS, 4, float("nan"), 0), "alpha"),
    (lambda: partition_dirichlet(LABELS, 4, float("inf"), 0), "alpha"),
    (lambda: partition_dirichlet(LABELS, 0, 0.5, 0), "num_clients"),
    (lambda: partition_dirichlet(LABELS, 4, 0.5, 0, min_size=-1), "min_size"),
    (lambda: partition_shards(LABELS, 4, 0, 0), "classes_per_client"),
    (lambda: partition_shards(LABELS, 4, 11, 0), "classes"),
    (lambda: partition_shards(LABELS[:10], 4, 3, 0), "exceeds"),
    (lambda: partition_shards(LABELS, 7000, 1, 0), "exceeds"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
