"""FedAvg over the adapter tensors, weighted by examples (or by site under central DP), with
optional server momentum (``federation.server-momentum``): Flower's FedAvgM, which is
Flower's FedAvg when the momentum is 0. Adds fedhaven's reply validation, bookkeeping and
optional norm bounding (:class:`~fedhaven.strategies.base.Validated`), the momentum scaled
with the sites' learning-rate schedule, and the momentum as ``state_dict`` /
``load_state_dict``, so a resumed run steps as the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM

from fedhaven.strategies.base import Validated


def _constant(server_round: int) -> float:
    return 1.0


class FedAvg(Validated, FlowerFedAvgM):
    """``lr_factor(round)``: the share of the sites' learning rate in that round
    (``training.lr_factor``); it scales each round's momentum (below). Constant by default."""

    def __init__(self, *, lr_factor: Callable[[int], float] = _constant, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lr_factor = lr_factor
        self.base_momentum = self.server_momentum

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # The sites' updates shrink with their learning rate; the momentum is kept in the
        # units of the unscaled update, as torch's SGD keeps its buffer in gradient units
        # under a scheduler: β times this round's rate over the last one's. A constant β
        # carried the first rounds' large steps into the last ones (20 Newsgroups lost 2
        # points that way; BENCHMARKS.md, every text set).
        if server_round > 1:
            ratio = self.lr_factor(server_round) / self.lr_factor(server_round - 1)
            self.server_momentum = self.base_momentum * ratio
        return super().aggregate_train(server_round, replies)

    def state_dict(self) -> dict[str, Any]:
        momentum = self.momentum_vector
        return {"momentum": None if momentum is None else [v.copy() for v in momentum]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        momentum = state["momentum"]
        self.momentum_vector = None if momentum is None else [np.array(v) for v in momentum]
