"""What crosses the wire, in one place: message keys, the outgoing allow-list, and the
adapter tensors <-> ``ArrayRecord`` conversion.

No other module spells a message key. A site's reply carries exactly one ``ArrayRecord``
(the adapter + head tensors, train replies only) and one ``MetricRecord`` whose keys are in
:data:`TRAIN_METRICS` / :data:`EVALUATE_METRICS`; nothing else leaves a site.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

# Record names inside a Message's RecordDict (Flower strategies take them as arguments).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Config keys the coordinator sends.
SERVER_ROUND = "server-round"  # injected by Flower's strategies
CLIPPING_NORM = KEY_CLIPPING_NORM  # central DP, client-side clipping: the bound (Flower's key)
ADAPTIVE_CLIPPING = "adaptive-clipping"  # ... and whether to report the norm bit as well
# FedProx: μ of the proximal term the site adds to its local objective. Flower's FedProx
# writes this key itself (a literal in flwr/serverapp/strategy/fedprox.py).
PROXIMAL_MU = "proximal-mu"

# Metric keys a site may send. NUM_EXAMPLES weights FedAvg.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # cumulative ε of this site after the round (absent without DP)
NOISE_MULTIPLIER = "noise-multiplier"
STEPS = "steps"
LOSS = "loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
PERPLEXITY = "perplexity"
EXACT_MATCH = "exact-match"
TOKEN_F1 = "token-f1"
#: A task's evaluation metric names (``Task.metrics``) -> the keys a site sends them under.
METRIC_KEYS = {
    "loss": LOSS,
    "accuracy": ACCURACY,
    "macro_f1": MACRO_F1,
    "perplexity": PERPLEXITY,
    "exact_match": EXACT_MATCH,
    "token_f1": TOKEN_F1,
}
# 1 per site: central DP's FedAvg weighs by it, as its sensitivity bound needs every site to
# count the same (num-examples weights would let a large site move the model further).
SITE_WEIGHT = "site-weight"
# Central DP with client-side adaptive clipping: was the update within the bound? (Flower's
# key; the coordinator adds noise to the count of these bits.)
NORM_BIT = KEY_NORM_BIT
# For the model card: the site's row count (train + validation) and 48 bits of a hash of its
# rows, computed at the site (fedhaven.data.fingerprint).
DATA_ROWS = "data-rows"
DATA_FINGERPRINT = "data-fingerprint"
# Where the site checks its file (fedhaven.datacheck: a deployed text classification site),
# for the model card: rows in the file, rows the checks dropped (duplicates among them),
# and how many of the run's classes fall below the site's minimum. Totals, never per label:
# exact label counts would bypass the DP label prior.
DATA_ROWS_IN = "data-rows-in"
DATA_DROPPED = "data-dropped"
DATA_DUPLICATES = "data-duplicates"
DATA_SMALL_CLASSES = "data-small-classes"

TRAIN_METRICS = frozenset(
    {
        NUM_EXAMPLES,
        TRAIN_LOSS,
        EPSILON,
        NOISE_MULTIPLIER,
        STEPS,
        SITE_WEIGHT,
        NORM_BIT,
        DATA_ROWS,
        DATA_FINGERPRINT,
        DATA_ROWS_IN,
        DATA_DROPPED,
        DATA_DUPLICATES,
        DATA_SMALL_CLASSES,
    }
)
EVALUATE_METRICS = frozenset({NUM_EXAMPLES, *METRIC_KEYS.values()})

#: Error code of a site's deliberate refusal (its privacy budget): Flower's codes are < 100.
REFUSED = 100

# Opacus wraps a model as GradSampleModule(_module=...): its state_dict keys gain this prefix.
OPACUS_PREFIX = "_module."


def canonical_name(name: str) -> str:
    """A parameter name without wrapper prefixes, as the PEFT model itself names it."""
    while name.startswith(OPACUS_PREFIX):
        name = name[len(OPACUS_PREFIX) :]
    return name


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors -> ArrayRecord (keys are the canonical PEFT parameter names)."""
    return ArrayRecord({canonical_name(k): v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> adapter tensors (the caller loads them strictly)."""
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}


def shapes(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in an ArrayRecord (what a reply must match)."""
    return {k: tuple(a.shape) for k, a in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor payload in an ArrayRecord."""
    return sum(len(a.data) for a in record.values())


def train_reply(state: Mapping[str, torch.Tensor], metrics: Mapping[str, float]) -> RecordDict:
    return RecordDict({ARRAYS: to_record(state), METRICS: MetricRecord(dict(metrics))})


def evaluate_reply(metrics: Mapping[str, float]) -> RecordDict:
    return RecordDict({METRICS: MetricRecord(dict(metrics))})


def check_reply(
    content: RecordDict, *, train: bool, expected: Mapping[str, tuple[int, ...]] | None = None
) -> None:
    """Raise ``ValueError`` unless ``content`` holds only what may leave a site.

    Train replies: one ArrayRecord named :data:`ARRAYS` whose keys (and shapes, when
    ``expected`` is given) are the adapter's, plus the metrics record. Evaluate replies:
    the metrics record only. Metric keys must be in the allow-list.
    """
    allowed = {METRICS, ARRAYS} if train else {METRICS}
    extra = set(content.keys()) - allowed
    if extra:
        raise ValueError(f"reply carries records outside the allow-list: {sorted(extra)}")
    if not isinstance(content.get(METRICS), MetricRecord):
        raise ValueError(f"reply has no MetricRecord '{METRICS}'")
    metric_keys = set(content[METRICS].keys())
    bad = metric_keys - (TRAIN_METRICS if train else EVALUATE_METRICS)
    if bad:
        raise ValueError(f"reply carries metrics outside the allow-list: {sorted(bad)}")
    if NUM_EXAMPLES not in metric_keys:
        raise ValueError(f"reply has no '{NUM_EXAMPLES}'")
    if not train:
        return
    arrays = content.get(ARRAYS)
    if not isinstance(arrays, ArrayRecord):
        raise ValueError(f"train reply has no ArrayRecord '{ARRAYS}'")
    if expected is not None:
        if set(arrays.keys()) != set(expected):
            raise ValueError(
                "reply tensors differ from the adapter's: "
                f"unexpected {sorted(set(arrays.keys()) - set(expected))[:3]}, "
                f"missing {sorted(set(expected) - set(arrays.keys()))[:3]}"
            )
        for k, arr in arrays.items():
            if tuple(arr.shape) != tuple(expected[k]):
                raise ValueError(
                    f"reply tensor '{k}' has shape {arr.shape}, expected {expected[k]}"
                )


def train_config(server_round: int) -> ConfigRecord:
    return ConfigRecord({SERVER_ROUND: server_round})
