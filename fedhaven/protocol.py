"""What crosses the wire, in one place: message keys, the outgoing allow-list, and the
adapter tensors <-> ``ArrayRecord`` conversion.

No other module spells a message key. A site's reply carries exactly one ``ArrayRecord``
(the adapter + head tensors, train replies only) and one ``MetricRecord`` whose keys are in
:data:`TRAIN_METRICS` / :data:`EVALUATE_METRICS`; nothing else leaves a site.

Under secure aggregation (``federation.secure-aggregation``) a training round is Flower's
SecAgg+ exchange, whose messages have the shape of Flower's legacy ``fit``: the allow-list
then admits, per stage, only what Flower's ``secaggplus_mod`` sends (:data:`SECAGG_REPLY`:
public keys, encrypted key shares, the masked vector, key shares), and with the masked
vector the legacy ``fitres`` records holding the allow-listed metrics and no tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
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


# --- secure aggregation (Flower's SecAgg+) ---------------------------------------------------

#: The ConfigRecord of every SecAgg+ message (Flower's name), and its stage key.
SECAGG = RECORD_KEY_CONFIGS
SECAGG_STAGE = Key.STAGE
# Config keys of a SecAgg+ round's fit instructions: legacy Parameters carry no names, so the
# adapter's tensor names go along in order (one string, a name a line: a legacy config holds
# no lists); and the metric that weighs the site's update
# (num-examples, or site-weight under central DP), which Flower's mod reads as num_examples.
ARRAY_KEYS = "array-keys"
SECAGG_WEIGHT = "secagg-weight"
#: Stage -> the keys a site's SecAgg+ reply may carry in :data:`SECAGG`.
SECAGG_REPLY = {
    Stage.SETUP: frozenset({Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}),
    Stage.SHARE_KEYS: frozenset({Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}),
    Stage.COLLECT_MASKED_VECTORS: frozenset({Key.MASKED_PARAMETERS}),
    Stage.UNMASK: frozenset({Key.NODE_ID_LIST, Key.SHARE_LIST}),
}
# Flower's legacy fit records (flwr.compat.common.recorddict_compat spells them).
_FITRES = "fitres"
FITRES_PARAMETERS = f"{_FITRES}.parameters"
FITRES_METRICS = f"{_FITRES}.metrics"
FITRES_NUM_EXAMPLES = f"{_FITRES}.num_examples"
FITRES_STATUS = f"{_FITRES}.status"


def legacy_fit_ins(content: RecordDict, weight_key: str) -> FitIns:
    """A train instruction (:data:`ARRAYS`, :data:`CONFIG`) as Flower's legacy ``FitIns``,
    which SecAgg+ sends to a site with its key shares."""
    arrays = content[ARRAYS]
    config = {**content[CONFIG], ARRAY_KEYS: "\n".join(arrays.keys()), SECAGG_WEIGHT: weight_key}
    return FitIns(ndarrays_to_parameters([a.numpy() for a in arrays.values()]), config)


def from_legacy_fit_ins(content: RecordDict) -> tuple[RecordDict, list[str], str]:
    """The site's side of :func:`legacy_fit_ins`: the train instruction, the tensor names in
    the order the masked vector must follow, and the metric that weighs the update."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    keys, weight_key = str(config.pop(ARRAY_KEYS)).split("\n"), str(config.pop(SECAGG_WEIGHT))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(arrays):
        raise ValueError(f"{len(arrays)} tensors came with {len(keys)} names")
    record = ArrayRecord({k: Array(a) for k, a in zip(keys, arrays, strict=True)})
    return RecordDict({ARRAYS: record, CONFIG: ConfigRecord(config)}), keys, weight_key  # type: ignore[arg-type]


def legacy_fit_res(content: RecordDict, keys: list[str], weight_key: str) -> RecordDict:
    """A train reply as Flower's legacy ``FitRes`` records, the tensors in the order ``keys``
    (what Flower's ``secaggplus_mod`` masks), weighted by the metric ``weight_key``."""
    arrays, metrics = content[ARRAYS], dict(content[METRICS])
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([arrays[k].numpy() for k in keys]),
        int(metrics[weight_key]),  # type: ignore[arg-type]
        metrics,  # type: ignore[arg-type]
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def from_legacy_aggregate(
    aggregate: list[np.ndarray], sent: ArrayRecord, metrics: Mapping[str, float]
) -> RecordDict:
    """The coordinator's side: SecAgg+'s dequantised mean (float64, in the order sent) as a
    train reply's content, with the names and dtypes of the tensors sent."""
    record = ArrayRecord(
        {
            k: Array(np.asarray(a, dtype=s.numpy().dtype))
            for (k, s), a in zip(sent.items(), aggregate, strict=True)
        }
    )
    return RecordDict({ARRAYS: record, METRICS: MetricRecord(dict(metrics))})


def check_secagg_reply(content: RecordDict, stage: str) -> None:
    """Raise ``ValueError`` unless a SecAgg+ reply of ``stage`` holds only what the protocol
    sends: its :data:`SECAGG` keys, and with the masked vector the legacy fit records of
    allow-listed metrics and an empty tensor record (Flower's mod clears it)."""
    allowed = {SECAGG}
    if stage == Stage.COLLECT_MASKED_VECTORS:
        allowed |= {FITRES_PARAMETERS, FITRES_METRICS, FITRES_NUM_EXAMPLES, FITRES_STATUS}
    extra = set(content.keys()) - allowed
    if extra:
        raise ValueError(f"secure aggregation reply carries records {sorted(extra)}")
    keys = set(content[SECAGG].keys()) if SECAGG in content else set()
    if keys != SECAGG_REPLY.get(stage):
        raise ValueError(f"secure aggregation reply of stage '{stage}' carries {sorted(keys)}")
    if stage != Stage.COLLECT_MASKED_VECTORS:
        return
    if len(content[FITRES_PARAMETERS]):
        raise ValueError("secure aggregation reply carries unmasked tensors")
    bad = set(content[FITRES_METRICS].keys()) - TRAIN_METRICS
    if bad:
        raise ValueError(f"reply carries metrics outside the allow-list: {sorted(bad)}")
