"""FedProx (Li et al., 2020): Flower's FedProx, which sends ``proximal-mu`` in every train
config (:data:`fedhaven.protocol.PROXIMAL_MU`); the sites' training loop adds the proximal
term's gradient μ·(w − w_global) to the trainable weights' gradients (after Opacus's noise
under DP). The aggregate is FedAvg's. Overrides nothing but what
:class:`~fedhaven.strategies.base.Validated` adds.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx as FlowerFedProx

from fedhaven.strategies.base import Validated


class FedProx(Validated, FlowerFedProx):
    pass
