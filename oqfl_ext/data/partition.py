"""Splitting a labelled training set among federated clients.

Every partitioner takes the labels (a 1-D integer tensor, array or sequence of class ids
``>= 0``) and returns ``num_clients`` int64 index tensors that are disjoint and together cover
every index exactly once; each tensor is sorted. Results depend only on the arguments and the
``seed`` (a private ``torch.Generator``, or ``numpy.random.default_rng(seed)`` for the
Dirichlet draws; the global random states are neither used nor advanced).
"""

from __future__ import annotations

import heapq
import math
from typing import List, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["partition_iid", "partition_dirichlet", "partition_shards", "partition_stats"]


def _labels(labels) -> Tensor:
    t = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if t.dim() != 1:
        raise ValueError(f"labels expected a 1-D sequence, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"labels expected integer class ids, got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"labels expected class ids >= 0, got {int(t.min())}")
    return t


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check(labels, num_clients, seed):
    y = _labels(labels)
    k = _int_arg("num_clients", num_clients, 1)
    if k > y.numel():
        raise ValueError(f"num_clients ({k}) exceeds the number of samples ({y.numel()}); "
                         f"expected at most {y.numel()}: every client needs at least one sample")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
            0 <= seed < 2 ** 63):
        raise ValueError(f"seed expected an integer in [0, 2**63), got {seed!r}")
    g = torch.Generator().manual_seed(int(seed))
    return y, k, g


def _finish(parts: List[Tensor]) -> List[Tensor]:
    return [torch.sort(p.to(torch.int64))[0] for p in parts]


def partition_iid(labels, num_clients: int, seed: int = 0) -> List[Tensor]:
    """Shuffles the indices and splits them into ``num_clients`` parts whose sizes differ by at
    most one (the label distribution of each part is that of the whole set, up to sampling)."""
    y, k, g = _check(labels, num_clients, seed)
    perm = torch.randperm(y.numel(), generator=g)
    return _finish(list(torch.tensor_split(perm, k)))


def _dirichlet_draw(rng, by_class: List[np.ndarray], k: int, alpha: float):
    """One draw: for every class, its shuffled indices and ``k + 1`` bounds (client ``c`` gets
    ``shuffled[bounds[c]:bounds[c + 1]]``), plus every client's sample count."""
    draw, sizes = [], np.zeros(k, dtype=np.int64)
    for idx in by_class:
        idx = rng.permutation(idx)
        p = rng.dirichlet(np.full(k, float(alpha)))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # tiny alpha can underflow
            p = np.zeros(k)
            p[rng.integers(k)] = 1.0
        cuts = np.round(np.cumsum(p) / p.sum() * idx.size).astype(np.int64)
        # the chunks np.split(idx, np.maximum.accumulate(cuts[:-1])) would give
        bounds = np.minimum(np.concatenate(([0], np.maximum.accumulate(cuts[:-1]), [idx.size])),
                            idx.size)
        draw.append((idx, bounds))
        sizes += np.diff(bounds)
    return draw, sizes


def _top_up(chunks: List[List[np.ndarray]], min_size: int) -> None:
    """Moves samples, in place, from the largest clients to each client (in client order) with
    fewer than ``min_size``, taking them from the class the donor has most of so that the
    receiver is dominated by one class too. ``chunks[client][class]``: the client's indices of
    that class. Needs ``len(chunks) * min_size`` <= the number of samples: while a client is
    short, the largest one then holds more than ``min_size``."""
    sizes = [sum(a.size for a in row) for row in chunks]
    heap = [(-s, c) for c, s in enumerate(sizes)]  # largest first, then the lowest index
    heapq.heapify(heap)
    for r, row in enumerate(chunks):
        while sizes[r] < min_size:
            neg, d = heapq.heappop(heap)
            if -neg != sizes[d]:  # an entry from before the client's size changed
                continue
            take = min(min_size - sizes[r], sizes[d] - min_size)
            sizes[d] -= take
            sizes[r] += take
            while take:
                j = max(range(len(row)), key=lambda c: (chunks[d][c].size, -c))
                m = min(take, chunks[d][j].size)
                src, keep = chunks[d][j], chunks[d][j].size - m
                chunks[d][j], row[j] = src[:keep], np.concatenate((row[j], src[keep:]))
                take -= m
            heapq.heappush(heap, (-sizes[d], d))
            heapq.heappush(heap, (-sizes[r], r))


def partition_dirichlet(labels, num_clients: int, alpha: float, seed: int = 0,
                        min_size: int = 1, max_tries: int = 1000) -> List[Tensor]:
    """Label-skewed split (Hsu et al. 2019): for every class, the proportions of its samples
    that go to the clients are drawn from ``Dirichlet(alpha * 1)``; small ``alpha`` (e.g. 0.1)
    gives clients dominated by few classes, large ``alpha`` approaches :func:`partition_iid`.

    Draws are repeated (continuing the same seeded generator, so still reproducible) until
    every client has at least ``min_size`` samples. When none of ``max_tries`` draws does (many
    clients, small ``alpha``), the draw that lacks the fewest samples is kept and topped up:
    each client short of ``min_size`` gets the missing samples from the currently largest
    client, from the class that client has most of (so the label skew is mostly kept).
    ValueError at once when ``min_size * num_clients`` exceeds the number of samples. The draws
    use ``numpy.random.default_rng(seed)``.
    """
    y, k, _ = _check(labels, num_clients, seed)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not (
            math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha expected a finite number > 0, got {alpha!r}")
    min_size = _int_arg("min_size", min_size, 0)
    max_tries = _int_arg("max_tries", max_tries, 1)
    if min_size * k > y.numel():
        raise ValueError(f"min_size ({min_size}) * num_clients ({k}) exceeds the number of "
                         f"samples ({y.numel()}); expected min_size <= {y.numel() // k}")
    rng = np.random.default_rng(int(seed))
    yn = y.numpy()
    by_class = [np.flatnonzero(yn == c) for c in np.unique(yn)]
    best, best_missing = None, None
    for _ in range(max_tries):
        draw, sizes = _dirichlet_draw(rng, by_class, k, alpha)
        missing = int(np.maximum(min_size - sizes, 0).sum())
        if best_missing is None or missing < best_missing:
            best, best_missing = draw, missing
        if missing == 0:
            break
    chunks = [[idx[b[c]:b[c + 1]] for idx, b in best] for c in range(k)]
    if best_missing:
        _top_up(chunks, min_size)
    return _finish([torch.from_numpy(np.concatenate(row).astype(np.int64)) for row in chunks])


def partition_shards(labels, num_clients: int, classes_per_client: int,
                     seed: int = 0) -> List[Tensor]:
    """Pathological non-IID split (McMahan et al. 2017): the indices, grouped by class (classes
    in a random order, samples shuffled within a class), are cut into
    ``num_clients * classes_per_client`` shards of (nearly) equal size and dealt out
    ``classes_per_client`` per client: a random deal when one of 50 tries gives every client as
    many distinct classes as the strided deal (client ``i`` takes shards ``i, i + num_clients,
    i + 2 * num_clients, ...``), else the strided deal. When all classes have the same size
    and it divides into whole shards (``num_clients * classes_per_client`` a multiple of the
    class count), every client therefore holds samples of exactly ``classes_per_client``
    classes."""
    y, k, g = _check(labels, num_clients, seed)
    m = _int_arg("classes_per_client", classes_per_client, 1)
    n_shards = k * m
    if n_shards > y.numel():
        raise ValueError(f"num_clients * classes_per_client ({k} * {m} = {n_shards}) exceeds the "
                         f"number of samples ({y.numel()}); expected at most one shard per sample")
    classes = torch.unique(y)
    if m > classes.numel():
        raise ValueError(f"classes_per_client ({m}) exceeds the number of classes "
                         f"({classes.numel()}); expected at most {classes.numel()}")
    rank = torch.empty(int(classes.max()) + 1, dtype=torch.int64)
    rank[classes] = torch.randperm(classes.numel(), generator=g)
    perm = torch.randperm(y.numel(), generator=g)
    order = perm[torch.sort(rank[y[perm]], stable=True)[1]]
    shards = torch.tensor_split(order, n_shards)
    shard_classes = [set(torch.unique(y[s]).tolist()) for s in shards]

    def worst(rows):  # the fewest distinct classes any client gets
        return min(len(set().union(*(shard_classes[s] for s in row))) for row in rows)

    strided = [[i + j * k for j in range(m)] for i in range(k)]
    target = worst(strided)
    rows = strided
    for _ in range(50):  # a random deal as good as the strided one, if one turns up quickly
        cand = torch.randperm(n_shards, generator=g).reshape(k, m).tolist()
        if worst(cand) >= target:
            rows = cand
            break
    deal = torch.randperm(k, generator=g).tolist()
    return _finish([torch.cat([shards[s] for s in rows[d]]) for d in deal])


def partition_stats(labels, parts: Sequence[Tensor]) -> str:
    """A text table: one row per client with its sample count, number of classes and class
    histogram, then a total row."""
    y = _labels(labels)
    n_classes = int(y.max()) + 1 if y.numel() else 0
    head = ["client", "samples", "classes"] + [str(c) for c in range(n_classes)]
    rows = []
    total = torch.zeros(n_classes, dtype=torch.int64)
    for i, p in enumerate(parts):
        idx = torch.as_tensor(p, dtype=torch.int64)
        hist = torch.bincount(y[idx], minlength=n_classes)
        total += hist
        rows.append([str(i), str(idx.numel()), str(int((hist > 0).sum()))]
                    + [str(v) for v in hist.tolist()])
    rows.append(["total", str(int(total.sum())), str(int((total > 0).sum()))]
                + [str(v) for v in total.tolist()])
    widths = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths))
                     for r in [head] + rows)
