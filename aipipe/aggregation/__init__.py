"""Server-side aggregation: a streaming weighted sum of node updates and a server optimizer.

    from aipipe.aggregation import make_aggregator

    aggregator = make_aggregator("fedadam", server_lr=0.01)
    aggregator.begin(global_weights)
    for delta, num_examples in updates:
        aggregator.accumulate(delta, num_examples)
    new_global = aggregator.finalize()

The robust aggregators (`trimmed_mean`, `median`, `krum`, `centered_clip`) keep every update of
the round and step by a robust delta (`aipipe.aggregation.robust`); `robust_reference` and
`update_scores` (`aipipe.aggregation.anomaly`) score each update against the round's median.

Under secure aggregation the hub calls `from_sum(global_weights, weighted_sum, total_examples)`
with the decrypted or unmasked sum instead. `get_state` / `set_state` carry FedAdam/FedYogi
moments (and a half-collected round) across hub restarts.
"""

from aipipe.aggregation.anomaly import UpdateScore, robust_reference, update_scores
from aipipe.aggregation.base import AggregationError, Aggregator, Weights
from aipipe.aggregation.fedavg import FedAvg
from aipipe.aggregation.fedopt import FedAdam, FedYogi
from aipipe.aggregation.fedprox import FedProx, proximal_term
from aipipe.aggregation.maths import (
    adam_step,
    fedavg_step,
    initial_moments,
    weighted_mean,
    yogi_step,
)
from aipipe.aggregation.registry import AGGREGATORS, aggregator_for, make_aggregator
from aipipe.aggregation.robust_aggregators import (
    CenteredClip,
    CoordinateMedian,
    Krum,
    RobustAggregator,
    TrimmedMean,
)

__all__ = [
    "AGGREGATORS",
    "AggregationError",
    "Aggregator",
    "CenteredClip",
    "CoordinateMedian",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "Krum",
    "RobustAggregator",
    "TrimmedMean",
    "UpdateScore",
    "Weights",
    "adam_step",
    "aggregator_for",
    "fedavg_step",
    "initial_moments",
    "make_aggregator",
    "proximal_term",
    "robust_reference",
    "update_scores",
    "weighted_mean",
    "yogi_step",
]
