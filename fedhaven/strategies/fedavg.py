"""FedAvg over the adapter tensors, weighted by examples (or by site under central DP), with
optional server momentum (``federation.server-momentum``): Flower's FedAvgM, which is
Flower's FedAvg when the momentum is 0. Adds fedhaven's reply validation, bookkeeping and
optional norm bounding (:class:`~fedhaven.strategies.base.Validated`) and the momentum as
``state_dict`` / ``load_state_dict``, so a resumed run steps as the uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM

from fedhaven.strategies.base import Validated


class FedAvg(Validated, FlowerFedAvgM):
    def state_dict(self) -> dict[str, Any]:
        momentum = self.momentum_vector
        return {"momentum": None if momentum is None else [v.copy() for v in momentum]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        momentum = state["momentum"]
        self.momentum_vector = None if momentum is None else [np.array(v) for v in momentum]
