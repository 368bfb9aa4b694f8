"""The maths of robust aggregation, as pure functions over a matrix of updates.

Every rule here takes the round's updates as one float64 matrix, a row per node and a column per
coordinate of the flattened model (`flatten` / `unflatten` convert from and to named arrays), and
returns the robust delta as one vector. None of them weighs a row by its node's example count: a
malicious node chooses the count it signs, so the usual robust rules (and these) count each node
once. `aipipe.aggregation.robust_aggregators` validates the updates before it calls these.

- `coordinate_median`: the median of each coordinate (Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML).
- `trimmed_mean`: per coordinate, drop the k smallest and the k largest values and average the
  rest (Yin et al. 2018).
- `krum_scores` / `krum_select`: Krum and multi-Krum (Blanchard et al. 2017, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS).
- `centered_clip`: centred clipping (Karimireddy, He and Jaggi 2021, "Learning from History for
  Byzantine Robust Optimization", ICML, Algorithm 2 / eq. (CC)).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from aipipe.aggregation.base import AggregationError

if TYPE_CHECKING:
    from aipipe.aggregation.base import Array, Weights


def flatten(weights: Mapping[str, Array], like: Iterable[str]) -> Array:
    """One float64 vector: the arrays named in `like`, in sorted name order, each raveled.

    Sorted, not insertion order: a model read back from the tensor codec comes in sorted order,
    and a round's saved updates must line up with it.
    """
    return np.concatenate([np.asarray(weights[k], dtype=np.float64).ravel() for k in sorted(like)])


def unflatten(vector: Array, like: Mapping[str, Array]) -> Weights:
    """Named float64 arrays with the shapes of `like`, cut from `vector` in sorted name order."""
    out: Weights = {}
    start = 0
    for key in sorted(like):
        shape = np.shape(like[key])
        size = int(np.prod(shape, dtype=np.int64))
        out[key] = vector[start : start + size].reshape(shape)
        start += size
    return out


def coordinate_median(updates: Array) -> Array:
    """The median of each column; with an even count, the mean of the two middle values."""
    n = updates.shape[0]
    if n % 2:
        (middle,) = order_statistics(updates, (n // 2,))
        return _f64(middle)
    lower, upper = order_statistics(updates, (n // 2 - 1, n // 2))
    return _f64(0.5 * (lower + upper))


def trimmed_mean(updates: Array, trim_count: int) -> Array:
    """Per column, the mean of the values left after dropping the `trim_count` lowest and highest.

    Yin et al. 2018 trim ⌊β·n⌋ per side; the caller computes that count. At least one value per
    column must remain, so 2·trim_count < n, refused otherwise.
    """
    n = updates.shape[0]
    if trim_count < 0 or 2 * trim_count >= n:
        raise AggregationError(
            f"trimmed mean of {n} updates cannot drop {trim_count} per side: nothing would "
            f"remain; lower trim below {n}/2 updates per side or wait for more nodes"
        )
    if trim_count == 0:
        return _f64(updates.mean(axis=0))
    kept = order_statistics(updates, tuple(range(trim_count, n - trim_count)))
    total = kept[0].copy()
    for row in kept[1:]:
        total += row
    return _f64(total / len(kept))


NETWORK_MAX = 32
"""Up to this many updates, `sorted_rows` runs a sorting network; past it, `np.sort`."""


def order_statistics(updates: Array, ranks: tuple[int, ...]) -> list[Array]:
    """Per column, the values of the given ranks (0 = smallest), one row per rank, in order.

    Up to `NETWORK_MAX` rows this runs the comparators of Batcher's sorting network that the
    wanted ranks depend on (`selection_network`) with whole-row `np.minimum` / `np.maximum`
    into reused buffers: for 12 rows, at most 42 comparators, each one pass over d values,
    measured about 3× faster than `np.sort(axis=0)`, which sorts d columns of n one by one (and
    faster still than `np.median`'s partition).
    """
    n = updates.shape[0]
    if n > NETWORK_MAX:
        ordered = np.sort(updates, axis=0)
        return [ordered[r] for r in ranks]
    rows = [updates[i].copy() for i in range(n)]
    spare = np.empty_like(rows[0]) if n > 1 else rows[0]
    for low, high in selection_network(n, ranks):
        np.minimum(rows[low], rows[high], out=spare)
        np.maximum(rows[low], rows[high], out=rows[high])
        rows[low], spare = spare, rows[low]
    return [rows[r] for r in ranks]


def sorted_rows(updates: Array) -> list[Array]:
    """The columns of `updates` sorted ascending, as n rows (row i holds the i-th smallest)."""
    return order_statistics(updates, tuple(range(updates.shape[0])))


@functools.cache
def selection_network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The comparators of `sorting_network(n)` that the output wires `ranks` depend on.

    Walking the network backwards from the wanted wires, a comparator is kept when it touches
    a wire still needed, and then both its wires are; a dropped one only changes wires whose
    values never reach a wanted output, so those outputs are exactly the sorted ones.
    """
    needed, kept = set(ranks), []
    for low, high in reversed(sorting_network(n)):
        if low in needed or high in needed:
            needed |= {low, high}
            kept.append((low, high))
    return tuple(reversed(kept))


@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for n wires, as (lower, upper) comparators in order.

    Built for the next power of two m ≥ n (Batcher 1968, "Sorting networks and their
    applications"; Knuth, TAOCP vol. 3, §5.3.4); the comparators that touch a wire ≥ n are
    dropped, which is exact: think of those wires as holding +∞, which no comparator moves, since
    each puts the larger value on its upper wire and wires ≥ n are the top ones.
    """
    m = 1 << max(n - 1, 0).bit_length()
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < m:
        k = p
        while k >= 1:
            for j in range(k % p, m - k, 2 * k):
                for i in range(min(k, m - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((low, high) for low, high in pairs if high < n)


def pairwise_squared_distances(updates: Array) -> Array:
    """‖x_i − x_j‖² for every pair of rows, by the Gram matrix of the rows.

    The rows are first taken relative to the first row (distances do not change) so that
    ‖x‖² + ‖y‖² − 2⟨x, y⟩ does not cancel the large norms a shared offset would give; an exact
    shift, so updates on a binary grid (e.g. small integers) get exact distances. Elsewhere
    rounding can leave ulp-sized differences between distances equal in exact arithmetic.
    The diagonal is 0.
    """
    centred = updates - updates[0]
    gram = centred @ centred.T
    squares = np.diag(gram)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(distances, 0.0)
    return _f64(distances)


def krum_scores(updates: Array, byzantine: int) -> Array:
    """Blanchard et al. 2017: score(i) = Σ of the n − f − 2 smallest ‖x_i − x_j‖², j ≠ i.

    Krum's guarantee needs n ≥ 2f + 3 (so that each score sums at least one distance); fewer
    updates are refused with the count, f and what to change.
    """
    n = updates.shape[0]
    check_krum_round(n, byzantine, 1)
    distances = pairwise_squared_distances(updates)
    np.fill_diagonal(distances, np.inf)  # a row is not its own neighbour
    nearest = np.sort(distances, axis=1)[:, : n - byzantine - 2]
    return _f64(nearest.sum(axis=1))


def check_krum_round(n: int, byzantine: int, multi: int) -> None:
    """Refuse a (multi-)Krum round of n updates unless n ≥ 2f + 3 and 1 ≤ m ≤ n − f."""
    if byzantine < 0 or n < 2 * byzantine + 3:
        raise AggregationError(
            f"krum with byzantine f={byzantine} needs n ≥ 2f + 3 = {2 * byzantine + 3} updates, "
            f"got n={n}; {_krum_fix(n)}"
        )
    if not 1 <= multi <= n - byzantine:
        raise AggregationError(
            f"multi-krum keeps m={multi} of n={n} updates with f={byzantine}, but needs "
            f"1 ≤ m ≤ n − f = {n - byzantine}; lower `multi` or raise the study's min_nodes"
        )


def krum_select(updates: Array, byzantine: int, multi: int) -> list[int]:
    """The rows multi-Krum keeps: the `multi` lowest scores, ties to the earlier row.

    multi = 1 is Krum; Blanchard et al. (§5, multi-Krum) average the m best-scored with
    m ≤ n − f, refused past that. The sort is stable, so equal scores keep row order: the
    update accumulated first wins a tie, which makes the choice deterministic.
    """
    check_krum_round(updates.shape[0], byzantine, multi)
    scores = krum_scores(updates, byzantine)
    order = np.argsort(scores, kind="stable")
    return [int(i) for i in order[:multi]]


def centered_clip(updates: Array, centre: Array, radius: float, iterations: int) -> Array:
    """Karimireddy et al. 2021: L times, v ← v + (1/n)·Σ_i (x_i − v)·min(1, τ/‖x_i − v‖).

    Each update's pull on v is at most τ/n per iteration, whatever its size; the map is
    non-expansive in v, so replacing one update moves the result by at most 2·L·τ/n. Written
    with two matrix-vector products per iteration, ‖x_i − v‖² = ‖x_i‖² − 2⟨x_i, v⟩ + ‖v‖² and
    Σ_i s_i·(x_i − v) = sᵀX − (Σ_i s_i)·v, so no n × d temporary is made. The products are
    numpy's own einsum loops, not BLAS (`X @ v`): OpenBLAS's threaded matrix-vector products
    were measured 20 to 100× slower than one thread on a busy 2-core host.
    """
    n = updates.shape[0]
    v = np.asarray(centre, dtype=np.float64).copy()
    squares = np.einsum("ij,ij->i", updates, updates)
    for _ in range(iterations):
        along = np.einsum("ij,j->i", updates, v)
        distances = np.sqrt(np.maximum(squares - 2.0 * along + np.einsum("j,j->", v, v), 0.0))
        scale = np.minimum(1.0, radius / np.maximum(distances, np.finfo(np.float64).tiny))
        v = v + (np.einsum("i,ij->j", scale, updates) - scale.sum() * v) / n
    return v


def _krum_fix(n: int) -> str:
    if n < 3:
        return "Krum needs at least 3 updates: raise the study's min_nodes to 3 or more"
    return (
        f"lower `byzantine` to at most {(n - 3) // 2} or raise the study's min_nodes so that "
        "more nodes report"
    )


def _f64(value: Array) -> Array:
    return np.asarray(value, dtype=np.float64)
