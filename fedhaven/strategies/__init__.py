"""Aggregation rules, each a small subclass of a Flower strategy (one file each)."""

from fedhaven.strategies.fedavg import FedAvg

__all__ = ["FedAvg"]
