"""Central (site-level) DP: Flower's clipping wrappers around our FedAvg (or FedProx), and
Flower's RDP accountant for the site-level (ε, δ) of the released models.

Which guarantee each option gives:

* ``privacy.enabled`` (DP-SGD at each site, Opacus): record-level. Whatever leaves a site is
  (ε, δ)-DP with respect to one *row* of that site's data — against everyone, the
  coordinator included. The site enforces it and keeps the ledger.
* ``privacy.central`` (this module): site-level. Every global model the coordinator releases
  is (ε, δ)-DP with respect to adding or removing one whole *site*. It assumes a trusted
  coordinator, which sees each (clipped) update before the noise.

The two compose: a run with both gives each row the site's record-level guarantee against the
coordinator, and each site the central guarantee against whoever sees the global model.

The noise on each coordinate is ``central-noise × clip / sites``: it needs many sites (hundreds)
to leave a usable model. Every sampled site must reply for a round to be released, and each
counts equally (``site-weight``): the sensitivity bound of the Gaussian mechanism assumes both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid, PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)

from fedhaven import protocol
from fedhaven.config import Config
from fedhaven.errors import FedhavenError
from fedhaven.strategies.base import Validated

log = logging.getLogger(__name__)


class _Accounted:
    """Release a round only if every sampled site's update went into it; account it.

    The wrapped strategy screens the replies first (validation, ``federation.max-update-norm``,
    the audit log), before Flower's wrapper clips them: it must see each update as the site
    sent it, and a reply it rejects never reaches Flower's clipping (where a wrong shape would
    end the run). A rejected reply leaves the round unreleased, as a failed one does.

    Flower's fixed wrappers account only around an unmodified ``FedAvg.aggregate_train``
    (ours validates replies first) and its adaptive ones not at all, so each released round
    composes one Gaussian event into Flower's accountant here. For adaptive clipping the
    noisy count of clipped updates and the noisy aggregate together are one Gaussian mechanism
    of the configured multiplier (Andrew et al., 2021, which Flower's wrappers implement).
    """

    strategy: Validated
    num_sampled_clients: int
    # not ``accountant``: Flower's fixed wrappers would compose into that one as well
    central_accountant: RdpAccountant
    total_noise: float

    clipping_norm: float

    def state_dict(self) -> dict[str, Any]:
        """The wrapped rule's state, the accountant's releases and the clipping bound (it
        moves every round under adaptive clipping)."""
        return {
            "strategy": self.strategy.state_dict(),
            "accountant": self.central_accountant.state_dict(),
            "clipping_norm": float(self.clipping_norm),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.central_accountant.load_state_dict(state["accountant"])
        self.clipping_norm = float(state["clipping_norm"])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        n = self.num_sampled_clients
        # logs every reply, rejects the invalid ones and checks the minimum
        accepted = self.strategy.screen_train(server_round, list(replies))
        arrays, metrics, used = None, None, len(accepted)
        if used == n:  # Flower's wrapper clips, the strategy aggregates (not screening again)
            arrays, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        if arrays is None:  # the noise is calibrated to n clipped updates
            log.warning(
                "round %d: %d of %d sites' updates usable: nothing released under central DP",
                server_round,
                used,
                n,
            )
            return None, None
        self.central_accountant.compose(GaussianPrivacyEvent(self.total_noise, n, n))
        return arrays, metrics


class ServerSideFixed(_Accounted, DifferentialPrivacyServerSideFixedClipping):
    pass


class ClientSideFixed(_Accounted, DifferentialPrivacyClientSideFixedClipping):
    pass


class _Adaptive(_Accounted):
    def _geometric_update(self, clipped_fraction: float) -> None:
        # Private hook: the bound's step has no public one in Flower 1.42 (test_flower_hooks.py).
        # Flower 1.42 steps on the fraction of updates *clipped*, so the bound shrinks when
        # every update is clipped and grows when none is: it runs away to 0 or infinity.
        # Andrew et al. (2021) step on the fraction *within* the bound: C·exp(−η(b − γ)).
        super()._geometric_update(1.0 - clipped_fraction)  # type: ignore[misc]


class ServerSideAdaptive(_Adaptive, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


class ClientSideAdaptive(_Adaptive, DifferentialPrivacyClientSideAdaptiveClipping):
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[protocol.ADAPTIVE_CLIPPING] = True  # the site's mod reports the norm bit
        return super().configure_train(server_round, arrays, config, grid)


def num_sampled(cfg: Config) -> int:
    """Sites per round, as Flower's FedAvg samples them from ``federation.sites`` nodes."""
    fed = cfg.federation
    return max(int(fed.sites * fed.fraction_train), min(fed.min_sites, fed.sites))


def wrap(base: Validated, cfg: Config) -> tuple[Strategy, RdpAccountant | None]:
    """``base`` under ``privacy.central``, and the accountant of the released rounds."""
    p = cfg.privacy
    if p.central == "off":
        return base, None
    if base.weighted_by_key != protocol.SITE_WEIGHT:
        raise FedhavenError(
            f"privacy.central = {p.central} needs every site weighted the same "
            f"('{protocol.SITE_WEIGHT}'): use federation.strategy fedavg, ffa or fedprox"
        )
    n = num_sampled(cfg)
    # Every sampled site is in every round: no amplification by sampling is claimed.
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=p.delta,
            population_size=n,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    strategy: _Accounted
    if p.central == "server-fixed":
        strategy = ServerSideFixed(base, p.central_noise, p.central_clip, n)
    elif p.central == "client-fixed":
        strategy = ClientSideFixed(base, p.central_noise, p.central_clip, n)
    else:
        adaptive = ServerSideAdaptive if p.central == "server-adaptive" else ClientSideAdaptive
        strategy = adaptive(
            base,
            p.central_noise,
            n,
            initial_clipping_norm=p.central_clip,
            # Flower's default (sites / 20) is too small for a few sites; 2z keeps the
            # update's own noise within 3% of z (1/z² = 1/z_update² + 1/(2σ_count)²).
            clipped_count_stddev=max(n / 20, 2 * p.central_noise),
        )
    strategy.central_accountant = accountant
    strategy.total_noise = p.central_noise
    return strategy, accountant
