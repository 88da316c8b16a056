"""FedAvg over the adapter tensors, weighted by examples (or by site under central DP):
Flower's FedAvg with fedhaven's reply validation, bookkeeping and optional norm bounding
(:class:`~fedhaven.strategies.base.Validated`). Overrides nothing else.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedhaven.strategies.base import Validated


class FedAvg(Validated, FlowerFedAvg):
    pass
