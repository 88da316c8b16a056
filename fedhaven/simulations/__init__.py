"""The one-box harness: N virtual sites partitioned from one dataset, the same ClientApp and
ServerApp as a deployment, run by Flower's simulation engine (Ray backend).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from fedhaven import data as fdata
from fedhaven.config import Config, from_flat
from fedhaven.models import resolve_model_path
from fedhaven.server.app import SIMULATION, ProgressFn

#: Offline by design: no telemetry, no hub, no runtime dependency installs.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
#: Quiet sites: library warnings and progress bars, printed by every Ray actor every round.
QUIET_ENV = {
    "PYTHONWARNINGS": "ignore",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def preflight(cfg: Config) -> None:
    """Fail fast, before Ray starts, on every user error we can see from here."""
    resolve_model_path(cfg.model.path)
    full = fdata.load(cfg.data.path, cfg.data)
    fdata.partition(full, cfg.data, cfg.federation.sites, cfg.train.seed)
    fdata.load(cfg.data.test_path, cfg.data, split="test")


def simulate(
    overrides: Mapping[str, Any], progress: ProgressFn | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Run a simulated federation; returns the run's ``summary.json`` content."""
    # Flower's import and the Ray actors need process-wide variables: restore the caller's.
    saved = dict(os.environ)
    try:
        return _simulate(overrides, progress, verbose)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _simulate(
    overrides: Mapping[str, Any], progress: ProgressFn | None, verbose: bool
) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from fedhaven.client.app import make_client_app
    from fedhaven.server.app import make_server_app

    flat = dict(overrides)
    cfg = from_flat(flat)
    if not cfg.federation.out_dir:
        flat["federation.out-dir"] = os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S"))
        cfg = from_flat(flat)
    preflight(cfg)
    # Ray actors inherit the driver's environment at start-up.
    os.environ.update(OFFLINE_ENV)
    if not verbose:
        os.environ.update(QUIET_ENV)
    run_simulation(
        server_app=make_server_app(flat, progress, engine=SIMULATION),
        client_app=make_client_app(flat),
        num_supernodes=cfg.federation.sites,
        backend_config={
            # One CPU per site: on a 2-core box two sites train at once, each in its own actor
            # that loads the base model once and keeps it for every round.
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    with open(os.path.join(cfg.federation.out_dir, "summary.json")) as f:
        return json.load(f)
