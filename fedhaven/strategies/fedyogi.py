"""FedYogi (Reddi et al., 2021): Flower's FedYogi over the adapter tensors — FedAdam with
Yogi's additive second moment, which grows more slowly after a burst of large updates. Adds
the server optimizer's state as ``state_dict`` / ``load_state_dict`` and keeps the adapter's
dtype (:class:`~fedhaven.strategies.base.ServerOptimizer`); the rest is
:class:`~fedhaven.strategies.base.Validated`.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedYogi as FlowerFedYogi

from fedhaven.strategies.base import ServerOptimizer, Validated


class FedYogi(ServerOptimizer, Validated, FlowerFedYogi):
    pass
