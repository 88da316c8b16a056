"""FedAdam (Reddi et al., 2021): Flower's FedAdam over the adapter tensors. The sites'
averaged update is a pseudo-gradient for an Adam step at the coordinator, of size
``federation.server-learning-rate``. Adds the server optimizer's state (its moments) as
``state_dict`` / ``load_state_dict`` and keeps the adapter's dtype
(:class:`~fedhaven.strategies.base.ServerOptimizer`); the rest is
:class:`~fedhaven.strategies.base.Validated`.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam as FlowerFedAdam

from fedhaven.strategies.base import ServerOptimizer, Validated


class FedAdam(ServerOptimizer, Validated, FlowerFedAdam):
    pass
