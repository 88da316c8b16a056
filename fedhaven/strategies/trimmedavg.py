"""Trimmed mean (Yin et al., 2018): Flower's FedTrimmedAvg. Per coordinate, the largest and
smallest ``federation.trim-beta`` fraction of the sites' values are cut (⌊β·sites⌋ at each
end: with β = 0.2 that needs 5 sites to cut anything) and the rest averaged, unweighted.
Overrides nothing but what :class:`~fedhaven.strategies.base.Validated` adds.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg

from fedhaven.strategies.base import Validated


class TrimmedAvg(Validated, FlowerFedTrimmedAvg):
    pass
