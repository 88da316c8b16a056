"""A site's own settings, typed: what its operator sets (``fedhaven site``, a deployment's node
config) or the harness sets for a simulated site; never the coordinator.

:meth:`SiteConfig.from_node` parses and checks a node config once; the launcher checks its
flags with :meth:`SiteConfig.check` and writes the node config from the result. A
:class:`SiteConfig` reads as the node config it stands for (a mapping of the keys it sets),
so it can go wherever a node config goes. No torch, no Flower: the site launcher imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fedhaven.config import (
    DATA_PATH,
    DELTA,
    EPSILON_BUDGET,
    LABEL_RULE,
    LORA_RANK,
    MIN_PER_CLASS,
    NUM_PARTITIONS,
    PARTITION_ID,
    STATE_DIR,
    UPDATE_SCALE,
)
from fedhaven.errors import FedhavenError

#: The numbers a site sets that have a range: (in range, what to give, an example).
RANGES: dict[str, tuple[Callable[[float], bool], str, str]] = {
    EPSILON_BUDGET: (lambda v: 0 < v < math.inf, "a positive number", "8"),
    DELTA: (lambda v: 0 < v < 1, "a number in (0, 1)", "1e-5"),
    LORA_RANK: (lambda v: v >= 1, "a whole number >= 1", "4"),
}


@dataclass(frozen=True, eq=False)
class SiteConfig(Mapping[str, Any]):
    """One site's settings; ``None``: not set (the run's value, or the default, applies).

    As a mapping its keys are the node-config keys it sets, so two are equal when they set
    the same values, and one equals the node config it was parsed from.
    """

    data_path: str | None = None
    state_dir: str | None = None
    label_rule: str | None = None  # checked by fedhaven.datacheck.DataRules, which knows them
    min_per_class: int | None = None
    epsilon_budget: float | None = None  # ε over the site's whole ledger
    delta: float | None = None  # δ of that budget
    lora_rank: int | None = None  # flexlora only
    partition_id: int | None = None  # a simulated site (Flower sets these)
    num_partitions: int | None = None
    update_scale: float | None = None  # a hostile simulated site (research only)

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> SiteConfig:
        """The settings in a node config, checked (Flower passes numbers as int or float, or
        text; a :class:`SiteConfig` passes as it is)."""
        if isinstance(node, SiteConfig):
            return node
        site = cls(
            data_path=_text(node, DATA_PATH),
            state_dir=_text(node, STATE_DIR),
            label_rule=_text(node, LABEL_RULE),
            min_per_class=_min_per_class(node),
            epsilon_budget=_number(node, EPSILON_BUDGET),
            delta=_number(node, DELTA),
            lora_rank=_rank(node),
            partition_id=_whole(node, PARTITION_ID),
            num_partitions=_whole(node, NUM_PARTITIONS),
            update_scale=_number(node, UPDATE_SCALE),
        )
        return site.check()

    def check(self, flags: bool = False) -> SiteConfig:
        """``self``, if every number is in its range; else one line naming the setting (as
        the launcher's ``--flag`` with ``flags``) and what to give."""
        for key, (ok, what, example) in RANGES.items():
            value = self.get(key)
            if value is None or ok(value):
                continue
            if flags:
                raise FedhavenError(f"--{key} {value:g} is invalid: give {what}, e.g. {example}")
            raise FedhavenError(f"site setting '{key}' = {value!r} is invalid: give {what}")
        return self

    # --- the node-config view ---------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        value = getattr(self, _FIELDS.get(key, "-"), None)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (key for key, name in _FIELDS.items() if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __hash__(self) -> int:  # frozen, like the run's Config: usable as a key
        return hash(tuple(self.items()))


#: Node-config key -> field name, in the order a node config lists them.
_FIELDS = {
    DATA_PATH: "data_path",
    STATE_DIR: "state_dir",
    LABEL_RULE: "label_rule",
    MIN_PER_CLASS: "min_per_class",
    EPSILON_BUDGET: "epsilon_budget",
    DELTA: "delta",
    LORA_RANK: "lora_rank",
    PARTITION_ID: "partition_id",
    NUM_PARTITIONS: "num_partitions",
    UPDATE_SCALE: "update_scale",
}


def _text(node: Mapping[str, Any], key: str) -> str | None:
    return None if node.get(key) is None else str(node[key])


def _number(node: Mapping[str, Any], key: str) -> float | None:
    raw = node.get(key)
    if raw is None:
        return None
    try:
        return float(raw)
    except (TypeError, ValueError):
        what = RANGES[key][1] if key in RANGES else "a number"
        raise FedhavenError(f"site setting '{key}' = {raw!r} is invalid: give {what}") from None


def _whole(node: Mapping[str, Any], key: str) -> int | None:
    return None if node.get(key) is None else int(node[key])


def _rank(node: Mapping[str, Any]) -> int | None:
    if node.get(LORA_RANK) is None:
        return None
    raw = node[LORA_RANK]
    rank = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    if isinstance(raw, str) and raw.strip().isdigit():
        rank = int(raw)
    if rank is None or rank < 1:
        raise FedhavenError(
            f"site setting '{LORA_RANK}' = {raw!r} is invalid: give the site's LoRA rank, "
            "a whole number >= 1"
        )
    return rank


def _min_per_class(node: Mapping[str, Any]) -> int | None:
    if node.get(MIN_PER_CLASS) is None:
        return None
    raw = node[MIN_PER_CLASS]
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    elif isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise FedhavenError(
            f"site setting '{MIN_PER_CLASS}' = {raw!r} is invalid: give a whole number >= 0 "
            "(0: no minimum)"
        )
    return raw
