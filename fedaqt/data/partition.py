"""Client partitions of an in-memory dataset: IID and label-skewed Dirichlet(α).

Why this is our own code: flwr-datasets' partitioners (``IidPartitioner``, ``DirichletPartitioner``) operate on
Hugging Face ``datasets.Dataset`` objects loaded through ``FederatedDataset``. This project keeps its image data
as in-memory idx tensors (read offline from Debian packages, see DATA.md) and never builds Hugging Face datasets,
so the two standard splits are implemented here on plain index arrays.

Both functions return a list with one sorted int64 index array per client; the arrays are disjoint, cover every
example, every client is non-empty, and the result is a deterministic function of the arguments (``seed``).

Shared facility: a workload that splits a labelled dataset across clients declares its options as (a subclass of)
:class:`PartitionOptions` (``-o partition=iid|dirichlet``, ``-o alpha=...``; ``--partition``/``--alpha`` are
shortcuts) and calls :func:`partition_indices`. The ASR workload partitions by speaker instead and declares its
own ``partition`` option allowing only ``"speaker"``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fedaqt.options import BaseOptions

#: partition schemes :func:`partition_indices` implements
PARTITIONS = ("iid", "dirichlet")


class PartitionOptions(BaseOptions):
    """How a labelled dataset is split across clients (options of image workloads)."""

    partition: Literal["iid", "dirichlet"] = Field(
        "iid", description="client data split: iid, or dirichlet (label skew, concentration alpha)"
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for partition=dirichlet (small = skewed)")


def partition_indices(options: PartitionOptions, labels, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split ``range(len(labels))`` across ``num_clients`` clients as ``options`` says.

    Args:
        options: ``partition`` ("iid": :func:`iid_partition`; "dirichlet": :func:`dirichlet_partition` with
            ``alpha``).
        labels: integer class labels ``[N]`` (numpy array, list or torch tensor; only its length is used for iid).
        num_clients: number of clients.
        seed: RNG seed (the same arguments give the same split).

    Returns:
        ``num_clients`` sorted int64 index arrays, disjoint, covering ``range(N)``.

    Raises:
        ValueError: an unknown ``partition``, or the counts/alpha the two functions refuse.
    """
    if options.partition == "dirichlet":
        y = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).reshape(-1)
        return dirichlet_partition(y, num_clients, options.alpha, seed)
    if options.partition == "iid":
        return iid_partition(len(labels), num_clients, seed)
    raise ValueError(f"partition={options.partition!r} is not allowed; choose one of: {', '.join(PARTITIONS)}")


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(num_examples)`` with ``seed`` and split it into ``num_clients`` near-equal parts.

    Returns:
        ``num_clients`` sorted int64 arrays; sizes differ by at most one.

    Raises:
        ValueError: ``num_clients < 1`` or more clients than examples.
    """
    _check_counts(num_examples, num_clients)
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels, num_clients: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 100
) -> list[np.ndarray]:
    """Label-skewed Dirichlet(α) split (Hsu et al. 2019; the NIID-Bench/FedML implementation).

    For every class, a vector of client proportions ``q ~ Dir(α·1)`` is drawn and the (shuffled) examples of that
    class are cut according to ``q``; clients that already hold more than ``N/num_clients`` examples get no share
    of later classes (keeps sizes bounded, as in NIID-Bench). Small ``α`` gives each client few classes; large
    ``α`` approaches IID. The draw is repeated (up to ``max_tries``) until every client has ``min_size``
    examples; if that still fails, the largest clients give examples to the smallest ones (deterministically).

    Args:
        labels: integer class labels, shape ``[N]`` (numpy array, list or torch tensor).
        num_clients: number of clients, 1 <= num_clients <= N / min_size.
        alpha: concentration, > 0.
        seed: RNG seed; the same arguments give the same partition.
        min_size: minimum examples per client (>= 1).

    Returns:
        ``num_clients`` sorted int64 index arrays, disjoint, covering ``range(N)``.

    Raises:
        ValueError: ``alpha <= 0`` (or not finite), ``min_size < 1``, ``num_clients < 1``, or
            ``num_clients * min_size > N``.
    """
    y = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).reshape(-1)
    n = int(y.shape[0])
    _check_counts(n, num_clients)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} is not allowed; the Dirichlet concentration must be > 0")
    if min_size < 1:
        raise ValueError(f"min_size={min_size!r} is not allowed; every client needs at least 1 example")
    if num_clients * min_size > n:
        raise ValueError(
            f"num_clients={num_clients} x min_size={min_size} = {num_clients * min_size} exceeds the {n} examples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    parts: list[list[int]] = []
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            q = rng.dirichlet(np.full(num_clients, float(alpha)))
            sizes = np.array([len(p) for p in parts])
            q = q * (sizes < n / num_clients)
            if q.sum() <= 0:  # every client already full: spread uniformly
                q = np.ones(num_clients)
            q = q / q.sum()
            cuts = (np.cumsum(q) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        # Deterministic repair: move examples from the currently largest client to each deficient one.
        for client in range(num_clients):
            while len(parts[client]) < min_size:
                donor = int(np.argmax([len(p) for p in parts]))
                parts[client].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_skew(labels, partition: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one (0 = IID).

    Returns a float in [0, 1]; used to check that skew grows as α shrinks.
    """
    y = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).reshape(-1)
    classes, y_idx = np.unique(y, return_inverse=True)
    glob = np.bincount(y_idx, minlength=len(classes)) / len(y)
    tvs = []
    for part in partition:
        local = np.bincount(y_idx[part], minlength=len(classes)) / max(len(part), 1)
        tvs.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(tvs))


def _check_counts(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} is not allowed; it must be >= 1")
    if num_clients > num_examples:
        raise ValueError(f"num_clients={num_clients} exceeds the number of examples ({num_examples}); "
                         "every client needs at least one example")
