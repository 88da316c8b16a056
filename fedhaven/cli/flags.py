"""`fedhaven simulate`'s and `fedhaven tune`'s flags, and how they become a flat run config.

A preset is overridden by a config file, that by ``--set``, that by the flags. The sites' own
settings (a ``[sites]`` table, ``--site-*``) are kept out of the run config: they go to the
sites only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedhaven.config import (
    EPSILON_BUDGET,
    LORA_RANK,
    SITES_PREFIX,
    STATE_DIR,
    UPDATE_SCALE,
    keys,
    load_toml,
)
from fedhaven.errors import FedhavenError

ConfigFile = Annotated[Path | None, typer.Option(help="TOML file of run-config keys")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="any run-config KEY=VALUE")]

#: A site's data rules (fedhaven.datacheck), for `fedhaven site` and `fedhaven data check`.
LabelRule = Annotated[
    str,
    typer.Option(
        help="a label outside the run's set, or differing only by case or whitespace: "
        "drop | map | stop"
    ),
]
MinPerClass = Annotated[int, typer.Option(help="warn below this many rows per class")]
Rounds = Annotated[int | None, typer.Option(help="federation rounds")]
Sites = Annotated[int | None, typer.Option(help="simulated sites")]
Data = Annotated[str | None, typer.Option(help="training data: csv, jsonl or parquet")]
Test = Annotated[str | None, typer.Option(help="held-out set for server-side evaluation")]
TextColumn = Annotated[str | None, typer.Option(help="column holding the text")]
LabelColumn = Annotated[str | None, typer.Option(help="column holding the label")]
Labels = Annotated[str | None, typer.Option(help="comma-separated label set, in order")]
Partition = Annotated[str | None, typer.Option(help="iid | dirichlet:ALPHA | column:NAME")]
Epsilon = Annotated[float | None, typer.Option(help="target ε per site over the run")]
NoDp = Annotated[bool, typer.Option("--no-dp", help="train without differential privacy")]
Model = Annotated[str | None, typer.Option(help="local Hugging Face model directory")]
LoraR = Annotated[int | None, typer.Option(help="LoRA rank")]
Seed = Annotated[int | None, typer.Option(help="seed for partitioning and init")]
Out = Annotated[Path | None, typer.Option(help="run directory (default runs/<timestamp>)")]
SiteBudget = Annotated[
    str | None,
    typer.Option(help="each simulated site's own ε budget: one number, or one per site"),
]
SiteState = Annotated[
    Path | None,
    typer.Option(help="root of the sites' state dirs (ledgers); reuse it to keep spending"),
]
SiteRank = Annotated[
    str | None,
    typer.Option(help="each simulated site's LoRA rank (flexlora): one, or one per site"),
]
SiteUpdateScale = Annotated[
    str | None,
    typer.Option(
        help="research: each simulated site's update is multiplied by this before it is "
        "sent (one per site, e.g. 100,1,1 for one hostile site); default 1"
    ),
]
Preset = Annotated[
    str | None,
    typer.Option(help="a named demo (instruct: SmolLM2; digits: images); flags override it"),
]
Task = Annotated[str | None, typer.Option(help="seq-cls | causal-lm | image-cls")]
Resume = Annotated[
    bool, typer.Option("--resume", help="continue the run in --out from its last round")
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        help="run the sites on this existing Ray cluster (HOST:PORT of its head, as "
        "'ray start --head' prints it) instead of a Ray started here for the run"
    ),
]


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedhavenError(
                f"--set {item!r} is not KEY=VALUE: e.g. --set train.learning-rate=0.01"
            )
        out[key.strip()] = value.strip()
    return out


def given(config: Path | None, sets: list[str] | None) -> dict[str, Any]:
    """The keys of a config file, overridden by ``--set``."""
    return {**(load_toml(config) if config else {}), **parse_set(sets or [])}


def run_flags(
    *,
    rounds: int | None,
    sites: int | None,
    data: str | None,
    test: str | None,
    text_column: str | None,
    label_column: str | None,
    labels: str | None,
    partition: str | None,
    epsilon: float | None,
    no_dp: bool,
    model: str | None,
    task: str | None,
    lora_r: int | None,
    seed: int | None,
    out: Path | None,
    resume: bool,
) -> dict[str, Any]:
    """The run-config keys the flags set (a flag not given sets none)."""
    flags: dict[str, Any] = {
        keys.FEDERATION_ROUNDS: rounds,
        keys.FEDERATION_SITES: sites,
        keys.DATA_PATH: data,
        keys.DATA_TEST_PATH: test,
        keys.DATA_TEXT_COLUMN: text_column,
        keys.DATA_LABEL_COLUMN: label_column,
        keys.DATA_LABELS: labels,
        keys.DATA_PARTITION: partition,
        keys.PRIVACY_EPSILON: epsilon,
        keys.PRIVACY_ENABLED: False if no_dp else None,
        keys.MODEL_PATH: model,
        keys.MODEL_TASK: task,
        keys.LORA_R: lora_r,
        keys.TRAIN_SEED: seed,
        keys.FEDERATION_OUT_DIR: str(out) if out else None,
        keys.FEDERATION_RESUME: True if resume else None,
    }
    return {k: v for k, v in flags.items() if v is not None}


def take_sites(
    flat: dict[str, Any],
    *,
    budget: str | None,
    state: Path | None,
    rank: str | None,
    update_scale: str | None,
) -> dict[str, Any]:
    """The sites' own settings, taken out of ``flat`` (its ``sites.*`` keys) and overridden
    by the ``--site-*`` flags."""
    sites = {
        k[len(SITES_PREFIX) :]: flat.pop(k) for k in [k for k in flat if k.startswith(SITES_PREFIX)]
    }
    flags = {EPSILON_BUDGET: budget, STATE_DIR: state, LORA_RANK: rank, UPDATE_SCALE: update_scale}
    return sites | {k: v for k, v in flags.items() if v is not None}
