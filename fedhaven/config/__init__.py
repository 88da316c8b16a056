"""The one typed run configuration.

Flower's run-config is flat (``{"train.learning-rate": 0.01, ...}``, values str|int|float|bool).
:func:`from_flat` turns it into a frozen :class:`Config` once, at each app boundary; everything
inward takes typed objects. Flat keys are ``<section>.<field>`` with ``-`` for ``_``.
Unknown keys and bad values raise :class:`~fedhaven.errors.FedhavenError`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from fedhaven.config import keys
from fedhaven.config.federation import (
    CENTRAL_DP_STRATEGIES,
    SECURE_AGGREGATION_CENTRAL,
    SECURE_AGGREGATION_STRATEGIES,
    STRATEGIES,
    FederationConfig,
)
from fedhaven.config.sections import (
    AUTO,
    BUNDLED,
    CENTRAL_DP,
    RECIPE,
    TASKS,
    DataConfig,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    _require,
    recipe,
)
from fedhaven.errors import FedhavenError

# The package's public names: its own and its sections' (one import path for all).
__all__ = [
    "AUTO",
    "BUNDLED",
    "CENTRAL_DP",
    "CENTRAL_DP_STRATEGIES",
    "DATA_PATH",
    "DELTA",
    "EPSILON_BUDGET",
    "LABEL_RULE",
    "LORA_RANK",
    "MIN_PER_CLASS",
    "NUM_PARTITIONS",
    "PARTITION_ID",
    "RECIPE",
    "RESUME_MAY_CHANGE",
    "SECURE_AGGREGATION_CENTRAL",
    "SECURE_AGGREGATION_STRATEGIES",
    "SITES_PREFIX",
    "STATE_DIR",
    "STRATEGIES",
    "TASKS",
    "UPDATE_SCALE",
    "Config",
    "DataConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "PrivacyConfig",
    "Scalar",
    "TrainConfig",
    "from_flat",
    "keys",
    "load_toml",
    "valid_keys",
]


Scalar = str | int | float | bool

# A site's own settings: Flower node-config keys, never run-config keys. Set by the site's
# operator (`fedhaven site`), or in a simulation by Flower (partition-id, num-partitions) and
# the harness (the rest). Here, not in the ClientApp, so the site launcher needs no torch.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
STATE_DIR = "state-dir"  # the site's own directory: its privacy ledger lives there
EPSILON_BUDGET = "epsilon-budget"  # the site's own ε limit over its whole ledger
DELTA = "delta"  # the site's own δ for that limit
LORA_RANK = "lora-rank"  # the site's own LoRA rank (federation.strategy = flexlora only)
# The site's rules for its own data (fedhaven.datacheck): what a label outside the run's set,
# or one differing only by case or whitespace, does (drop | map | stop), and the rows per
# class below which the site warns.
LABEL_RULE = "label-rule"
MIN_PER_CLASS = "min-per-class"
#: Simulation only, for research on robust rules: the site sends the global adapter plus this
#: multiple of its update (a hostile or broken site). No deployed site reads it.
UPDATE_SCALE = "update-scale"
#: The sites' own settings in a config file: a ``[sites]`` table (``sites.epsilon-budget``),
#: kept out of the run config and given to the sites only (``fedhaven simulate``).
SITES_PREFIX = "sites."
#: Run-config keys a resume may change: the switch itself, how long a round waits for the
#: sites, where the run directory lies (a moved run directory can still be resumed), and the
#: simulated sites' CPUs. Everything else shapes the model or the privacy guarantee and must
#: stay the checkpoint's (fedhaven.server.app) and names the run (fedhaven.privacy).
RESUME_MAY_CHANGE = (
    keys.FEDERATION_RESUME,
    keys.FEDERATION_ROUND_TIMEOUT,
    keys.FEDERATION_REJOIN_WAIT,
    keys.FEDERATION_OUT_DIR,
    keys.FEDERATION_SITE_CPUS,
)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def __post_init__(self) -> None:
        central, fed = self.privacy.central, self.federation
        _require(
            not fed.secure_aggregation or central in SECURE_AGGREGATION_CENTRAL,
            keys.PRIVACY_CENTRAL,
            central,
            "server-side clipping needs each site's update, which secure aggregation hides: "
            "use 'client-fixed' or 'client-adaptive', or federation.secure-aggregation = false",
        )
        if central == "off":
            return
        _require(
            fed.strategy in CENTRAL_DP_STRATEGIES,
            keys.FEDERATION_STRATEGY,
            fed.strategy,
            f"privacy.central = {central!r} calibrates its noise to the plain average of "
            f"clipped updates: use {' or '.join(CENTRAL_DP_STRATEGIES)}, or privacy.central = "
            "'off'",
        )
        _require(
            fed.server_momentum == 0,
            keys.FEDERATION_SERVER_MOMENTUM,
            fed.server_momentum,
            f"privacy.central = {central!r} noises each round's mean; momentum kept over the "
            "noiseless mean would leak past that noise: set it to 0",
        )
        _require(
            fed.update_norm_bound == 0,
            keys.FEDERATION_UPDATE_NORM_BOUND,
            fed.update_norm_bound,
            f"privacy.central = {central!r} already clips each update to privacy.central-clip:"
            " set it to 0",
        )

    def to_flat(self) -> dict[str, Scalar]:
        """The flat form Flower's run-config uses (inverse of :func:`from_flat`)."""
        return {
            _flat_key(sec.name, f.name): getattr(getattr(self, sec.name), f.name)
            for sec in fields(self)
            for f in fields(getattr(self, sec.name))
        }

    def replace(self, **flat: Scalar) -> Config:
        """A copy with some flat keys changed (validated like :func:`from_flat`). The
        recipe's values stay as they are when privacy.enabled changes; give one "auto" to
        take its value for the new setting."""
        return from_flat({**self.to_flat(), **flat})


def _flat_key(section: str, name: str) -> str:
    return f"{section}.{name.replace('_', '-')}"


#: How a value's expected type reads to a user.
_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _coerce(key: str, value: Any, typ: type) -> Scalar:
    # bool is an int subclass: check it first so True never passes as 1
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    auto = f" or '{AUTO}' (with or without DP: the recipe's value)" if key in RECIPE else ""
    raise FedhavenError(f"config '{key}' = {value!r} is invalid: expected {_TYPE_NAMES[typ]}{auto}")


def valid_keys() -> list[str]:
    return list(Config().to_flat())


def from_flat(flat: Mapping[str, Any]) -> Config:
    """Build the typed config from a flat mapping; absent keys take their defaults, and the
    recipe's (:data:`RECIPE`), absent or "auto", their value with or without DP."""
    sections: dict[str, dict[str, Scalar]] = {f.name: {} for f in fields(Config)}
    types: dict[str, tuple[str, str, type]] = {}
    for sec in fields(Config):
        sec_type = get_type_hints(Config)[sec.name]
        hints = get_type_hints(sec_type)
        for f in fields(sec_type):
            types[_flat_key(sec.name, f.name)] = (sec.name, f.name, hints[f.name])
    for key in flat:
        if key not in types:
            raise FedhavenError(f"unknown config key '{key}': valid keys are {', '.join(types)}")
    # The recipe's "auto" settings (and absent ones) take the value for privacy.enabled.
    enabled = flat.get(keys.PRIVACY_ENABLED, PrivacyConfig.enabled)
    private = _coerce(keys.PRIVACY_ENABLED, enabled, bool)
    auto = {k: recipe(k, bool(private)) for k in RECIPE if flat.get(k, AUTO) == AUTO}
    central = flat.get(keys.PRIVACY_CENTRAL, PrivacyConfig.central) != "off"
    if central and keys.FEDERATION_SERVER_MOMENTUM in auto:
        # central DP noises the plain mean: no momentum unless asked for (then refused)
        auto[keys.FEDERATION_SERVER_MOMENTUM] = recipe(keys.FEDERATION_SERVER_MOMENTUM, True)
    for key, value in {**flat, **auto}.items():
        sec_name, name, typ = types[key]
        sections[sec_name][name] = _coerce(key, value, typ)
    hints = get_type_hints(Config)
    return Config(**{name: hints[name](**values) for name, values in sections.items()})


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run-config TOML file (nested tables or dotted keys) into flat form."""
    p = Path(path)
    if not p.is_file():
        raise FedhavenError(f"config file '{p}' not found: pass an existing TOML file")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FedhavenError(f"config file '{p}' is not valid TOML ({e}): fix its syntax") from e
    # accept a pyproject-style file too
    data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
    return _flatten(data)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
