"""Aggregation rules, each a small subclass of a Flower strategy (one file each), chosen by
``federation.strategy``; every one has :class:`~fedhaven.strategies.base.Validated`."""

from fedhaven.strategies import central_dp
from fedhaven.strategies.base import Validated
from fedhaven.strategies.fedadam import FedAdam
from fedhaven.strategies.fedavg import FedAvg
from fedhaven.strategies.fedmedian import FedMedian
from fedhaven.strategies.fedprox import FedProx
from fedhaven.strategies.fedyogi import FedYogi
from fedhaven.strategies.ffa import FFA
from fedhaven.strategies.flexlora import FlexLoRA
from fedhaven.strategies.krum import Krum
from fedhaven.strategies.trimmedavg import TrimmedAvg

#: federation.strategy -> the rule (the names are fedhaven.config.STRATEGIES)
STRATEGIES: dict[str, type[Validated]] = {
    "fedavg": FedAvg,
    "ffa": FFA,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "trimmedavg": TrimmedAvg,
    "krum": Krum,
    "flexlora": FlexLoRA,
}

__all__ = [
    "FFA",
    "STRATEGIES",
    "FedAdam",
    "FedAvg",
    "FedMedian",
    "FedProx",
    "FedYogi",
    "FlexLoRA",
    "Krum",
    "TrimmedAvg",
    "Validated",
    "central_dp",
]
