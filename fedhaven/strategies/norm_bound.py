"""Norm bounding: clip each site's update to an L2 bound before the aggregation rule sees it.

A site's update is its reply minus the adapter the coordinator sent it, over all the tensors
at once (the bound is on the whole update, as in Sun et al., 2019, "Can you really backdoor
federated learning?"). An update within the bound is left as it is; a longer one keeps its
direction and gets the bound's length. No single site can then move the aggregate further
than ``weight × bound``, whatever it sends. It composes with every rule: it is a mixin that
every fedhaven strategy has through :class:`~fedhaven.strategies.base.Validated`, off (0)
unless ``federation.update-norm-bound`` sets it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

log = logging.getLogger(__name__)


def bound_update(
    reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], float]:
    """``sent + clip(reply − sent, bound)`` per tensor, and the update's norm before clipping."""
    update = {k: np.asarray(reply[k]) - sent[k] for k in sent}
    norm = math.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in update.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (sent[k] + update[k] * scale).astype(sent[k].dtype) for k in sent}, norm


class NormBounded(FlowerFedAvg):
    """Mixin (first in the bases, before a Flower strategy): bounds every train reply's update.

    Subclasses ``FedAvg`` only so that ``super()`` is typed; in ``class X(NormBounded,
    flwr.serverapp.strategy.FedMedian)`` Python's MRO runs this, then ``FedMedian``'s hooks.
    Replies reach it already validated (keys and shapes match what was sent).
    """

    def __init__(self, *, update_norm_bound: float = 0.0, **kwargs: Any) -> None:
        if update_norm_bound < 0:
            raise ValueError(f"update_norm_bound must be >= 0, got {update_norm_bound}")
        super().__init__(**kwargs)
        self.update_norm_bound = update_norm_bound
        self._sent: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.update_norm_bound:
            self._sent = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.update_norm_bound:
            if self._sent is None:
                raise RuntimeError("norm bounding needs the arrays sent: call configure_train")
            for msg in replies:
                record = msg.content[self.arrayrecord_key]
                bounded, norm = bound_update(
                    {k: a.numpy() for k, a in record.items()}, self._sent, self.update_norm_bound
                )
                if norm > self.update_norm_bound:
                    log.info(
                        "round %d: update of site %d has norm %.4g: bounded to %.4g",
                        server_round,
                        msg.metadata.src_node_id,
                        norm,
                        self.update_norm_bound,
                    )
                    # the reply's own key order; Flower's DP wrappers replace records alike
                    msg.content[self.arrayrecord_key] = ArrayRecord(
                        {k: Array(bounded[k]) for k in record.keys()}
                    )
        return super().aggregate_train(server_round, replies)
