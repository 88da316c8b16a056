"""FFA-LoRA (Sun et al., 2024): LoRA's A stays frozen at its seeded initialisation — the same
at every site and in every round — and only B (and the head) is trained and sent.

The model a site trains is W + (α/r)·B·A with a fixed A, so the average of the sites'
updates, mean_k(B_k·A), is exactly mean_k(B_k)·A: FedAvg of B is the exact aggregate, where
FedAvg of A and B separately is not (mean(B)·mean(A) ≠ mean(B·A)). Half the LoRA tensors
are sent, and the rule stays linear, so it composes with central DP and secure aggregation.
The freezing happens where the model is built (:func:`fedhaven.models.build_model` reads
``federation.strategy``); the aggregate is FedAvg's.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedhaven.strategies.base import Validated


class FFA(Validated, FlowerFedAvg):
    pass
