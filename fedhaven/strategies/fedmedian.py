"""FedMedian (Yin et al., 2018): Flower's FedMedian, the coordinate-wise median of the
sites' adapters. Robust to fewer than half the sites being hostile; ignores the example
counts (every site counts the same). Overrides nothing but what
:class:`~fedhaven.strategies.base.Validated` adds.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian as FlowerFedMedian

from fedhaven.strategies.base import Validated


class FedMedian(Validated, FlowerFedMedian):
    pass
