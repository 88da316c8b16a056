"""Aggregation rules, each a small subclass of a Flower strategy (one file each)."""

from fedhaven.strategies import central_dp
from fedhaven.strategies.fedavg import FedAvg

__all__ = ["FedAvg", "central_dp"]
