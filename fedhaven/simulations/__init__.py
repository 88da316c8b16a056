"""The one-box harness: N virtual sites partitioned from one dataset, the same ClientApp and
ServerApp as a deployment, run by Flower's simulation engine (Ray backend).

Each simulated site has what a real site sets for itself: a state directory holding its privacy
ledger (default ``<run>/sites/site-<i>``) and, optionally, its own ε budget and δ and its LoRA
rank (flexlora). They come from the ``sites`` table of a config file (or ``--site-budget`` /
``--site-state`` / ``--site-rank``) and go to the ClientApp only, like a deployed site's node
config: the coordinator never sees them.

For research on robust aggregation a simulated site can also be made hostile
(``update-scale``, ``--site-update-scale``): :func:`update_scale_mod` sends the adapter it
received plus that multiple of the site's update. Only the harness installs that mod.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedhaven import data as fdata
from fedhaven import protocol
from fedhaven.client.app import SiteSettings, node_settings, with_site_rank
from fedhaven.config import (
    BUNDLED,
    DELTA,
    EPSILON_BUDGET,
    LORA_RANK,
    SITES_PREFIX,
    STATE_DIR,
    UPDATE_SCALE,
    Config,
    keys,
)
from fedhaven.errors import FedhavenError
from fedhaven.report import write_report
from fedhaven.run_record import (
    SIMULATED_UPDATE_SCALE,
    SIMULATION,
    SUMMARY_FILE,
    run_directory,
)
from fedhaven.server.app import ProgressFn
from fedhaven.site_config import SiteConfig
from fedhaven.tasks import get_task

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


log = logging.getLogger(__name__)


def site_settings(spec: Mapping[str, Any], cfg: Config) -> dict[int, SiteConfig]:
    """Each simulated site's own settings from ``spec`` (keys without the prefix), checked
    as a deployed site's node config is.

    ``epsilon-budget`` and ``delta`` take one value for every site, or one per site (a list
    or a comma-separated string); ``state-dir`` is the root of the sites' state directories;
    ``lora-rank`` (federation.strategy = flexlora) one whole number, or one per site;
    ``update-scale`` (a hostile site, research only) one finite number per site, or one for all.
    """
    n = cfg.federation.sites
    known = (STATE_DIR, EPSILON_BUDGET, DELTA, LORA_RANK, UPDATE_SCALE)
    unknown = set(spec) - set(known)
    if unknown:
        raise FedhavenError(
            f"unknown site setting '{SITES_PREFIX}{sorted(unknown)[0]}': valid ones are "
            f"{', '.join(SITES_PREFIX + k for k in known)}"
        )
    root = Path(str(spec.get(STATE_DIR) or Path(cfg.federation.out_dir) / "sites"))
    if root.exists() and not root.is_dir():  # before Ray starts, not in every site's actor
        raise FedhavenError(
            f"site setting '{SITES_PREFIX}{STATE_DIR}' = '{root}' is not a directory: give a "
            "directory (it is created if missing)"
        )
    sites: dict[int, dict[str, Any]] = {i: {STATE_DIR: str(root / f"site-{i}")} for i in range(n)}
    for key, upper in ((EPSILON_BUDGET, float("inf")), (DELTA, 1.0)):
        if key not in spec:
            continue
        values = _per_site_numbers(spec[key], n)
        if not values or not all(0 < v < upper for v in values):
            fix = f"give one number in (0, {upper:g}) or {n} comma-separated ones, one per site"
            raise FedhavenError(
                f"site setting '{SITES_PREFIX}{key}' = {spec[key]!r} is invalid: {fix}"
            )
        for i, v in enumerate(values):
            sites[i][key] = v
    if UPDATE_SCALE in spec:
        raw = spec[UPDATE_SCALE]
        scales = _per_site_numbers(raw, n)
        if not scales or not all(math.isfinite(s) for s in scales):
            raise FedhavenError(
                f"site setting '{SITES_PREFIX}{UPDATE_SCALE}' = {raw!r} is invalid: give "
                f"{n} comma-separated numbers, one per site (1 = honest, e.g. 100 for a "
                "hostile site)"
            )
        for i, scale in enumerate(scales):
            if scale != 1.0:
                sites[i][UPDATE_SCALE] = scale
    if LORA_RANK in spec:
        raw = spec[LORA_RANK]
        items = raw.split(",") if isinstance(raw, str) else raw
        items = items if isinstance(items, list | tuple) else [items]
        ranks = [int(v) if str(v).strip().isdigit() else 0 for v in items]  # 0: not one
        if len(ranks) == 1:
            ranks *= n
        if len(ranks) != n or min(ranks, default=0) < 1:
            raise FedhavenError(
                f"site setting '{SITES_PREFIX}{LORA_RANK}' = {raw!r} is invalid: give one whole "
                f"number >= 1 or {n} comma-separated ones, one per site"
            )
        for i, rank in enumerate(ranks):
            with_site_rank(cfg, {LORA_RANK: rank})  # the site's own checks, before Ray starts
            sites[i][LORA_RANK] = rank
    return {i: SiteConfig.from_node(node) for i, node in sites.items()}


def _per_site_numbers(raw: Any, n: int) -> list[float]:
    """One number per site from one number, a list, or a comma-separated string (``[]``: not
    numbers, or a count other than 1 or ``n``)."""
    items = raw.split(",") if isinstance(raw, str) else raw
    items = items if isinstance(items, list | tuple) else [items]
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        return []
    values = values * n if len(values) == 1 else values
    return values if len(values) == n else []


def update_scale_mod(sites: SiteSettings) -> Mod:
    """A client mod for the harness: a site with an ``update-scale`` s sends, in place of its
    trained adapter w, ``w₀ + s·(w − w₀)`` (w₀: the adapter it received) — a hostile site
    (s = 100) or a sign-flipping one (s = −1) for the robust rules to face. Tensors whose
    shape differs from the one received (a flexlora site's own rank) are sent as they are.
    """

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        site = node_settings(ctxt, sites)
        scale = 1.0 if site.update_scale is None else site.update_scale
        if scale == 1.0 or reply.has_error() or msg.metadata.message_type != MessageType.TRAIN:
            return reply
        sent = {k: a.numpy() for k, a in msg.content[protocol.ARRAYS].items()}
        arrays = reply.content[protocol.ARRAYS]
        scaled = {}
        for k, a in arrays.items():
            w = a.numpy()
            if k in sent and sent[k].shape == w.shape:
                w = (sent[k] + scale * (w - sent[k])).astype(w.dtype)
            scaled[k] = Array(w)
        reply.content[protocol.ARRAYS] = ArrayRecord(scaled)
        return reply

    return mod


def backend_config(
    cfg: Config, cores: int | None = None, ray_address: str | None = None
) -> dict[str, Any]:
    """The Ray backend's settings: each site's actor gets ``federation.site-cpus`` CPUs (at
    most the machine's ``cores``), which Ray turns into its torch threads; the actor loads
    the base model once and keeps it for every round it serves.

    With ``ray_address`` Flower's backend joins that cluster (``ray.init(address=...)``)
    instead of starting one here: its nodes' CPUs decide how many sites train at once, and
    at the end the driver only disconnects — the cluster stays up.
    """
    if ray_address:  # Ray refuses num_cpus when it joins a cluster: the cluster has its own
        return {
            "client_resources": {"num_cpus": cfg.federation.site_cpus, "num_gpus": 0.0},
            "init_args": {"address": ray_address, "include_dashboard": False},
        }
    cores = cores or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": min(cfg.federation.site_cpus, cores), "num_gpus": 0.0},
        "init_args": {"num_cpus": cores, "include_dashboard": False},
    }


#: How long we wait for a Ray cluster's address to answer (ray.init retries for minutes).
RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds on a Ray address that is malformed or that nothing
    answers at: ``ray.init`` would retry it for about ten minutes."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")  # an IPv6 host: [::1]:6379
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or "/" in host:
        raise FedhavenError(
            f"--ray-address {address!r} is not HOST:PORT: give the address 'ray start --head' "
            "prints (e.g. 10.0.0.5:6379), or drop --ray-address"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise FedhavenError(
            f"no Ray cluster at {address}: {reason}; start one with 'ray start --head' or "
            "drop --ray-address"
        ) from None


#: Run-config keys that name a local path. A cluster's workers do not run in this
#: directory, so for them a relative path is made absolute here.
PATH_KEYS = (keys.MODEL_PATH, keys.DATA_PATH, keys.DATA_TEST_PATH, keys.FEDERATION_OUT_DIR)


def _absolute(flat: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``flat`` with the relative paths among ``names`` made absolute (``bundled`` kept)."""
    out = dict(flat)
    for key in names:
        value = out.get(key)
        if isinstance(value, str | Path) and str(value) not in ("", BUNDLED):
            out[key] = os.path.abspath(value)
    return out


def preflight(cfg: Config) -> None:
    """Fail fast, before Ray starts, on every user error we can see from here."""
    task = get_task(cfg)
    task.check()
    task.model_path()
    full = task.load(cfg.data.path)
    fdata.partition(full, cfg.data, cfg.federation.sites, cfg.train.seed)
    task.load(cfg.data.test_path, split="test")


def simulate(
    cfg: Config,
    progress: ProgressFn | None = None,
    verbose: bool = False,
    sites: Mapping[str, Any] | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run a simulated federation; returns the run's ``summary.json`` content.

    ``cfg`` is the run config; ``sites`` the sites' own settings (see :func:`site_settings`);
    ``ray_address`` an existing Ray cluster to run the sites on (``HOST:PORT`` of its head
    node; ``None``: a local Ray instance for this run only).
    """
    if ray_address:
        check_ray_address(ray_address)
    # Flower's import and the Ray actors need process-wide variables: restore the caller's.
    saved = dict(os.environ)
    try:
        return _simulate(cfg, progress, verbose, sites or {}, ray_address)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _simulate(
    cfg: Config,
    progress: ProgressFn | None,
    verbose: bool,
    sites: Mapping[str, Any],
    ray_address: str | None = None,
) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from fedhaven.client.app import make_client_app
    from fedhaven.server.app import make_server_app

    if not cfg.federation.out_dir:
        # one directory for the ServerApp and the sites' default state dirs alike
        cfg = cfg.replace(**{keys.FEDERATION_OUT_DIR: str(run_directory(cfg))})
    if ray_address:  # the cluster's workers read and write these paths, from another cwd
        cfg = cfg.replace(**_absolute(cfg.to_flat(), PATH_KEYS))
        sites = _absolute(sites, (STATE_DIR,))
    per_site: SiteSettings = site_settings(sites, cfg)
    hostile = {i: s[UPDATE_SCALE] for i, s in per_site.items() if UPDATE_SCALE in s}
    preflight(cfg)
    if hostile:
        log.warning("simulated hostile sites (update scale): %s", hostile)
    # Ray actors inherit the driver's environment at start-up.
    os.environ.update(OFFLINE_ENV)
    if not verbose:
        os.environ.update(QUIET_ENV)
    run_simulation(
        server_app=make_server_app(cfg, progress, engine=SIMULATION),
        client_app=make_client_app(
            cfg, per_site, mods=[update_scale_mod(per_site)] if hostile else ()
        ),
        num_supernodes=cfg.federation.sites,
        backend_config=backend_config(cfg, ray_address=ray_address),
    )
    path = os.path.join(cfg.federation.out_dir, SUMMARY_FILE)
    with open(path) as f:
        summary = json.load(f)
    if hostile:  # the run's record says which sites were made hostile
        summary[SIMULATED_UPDATE_SCALE] = {str(i): s for i, s in hostile.items()}
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        write_report(cfg.federation.out_dir)  # again, so the report and card say so too
    return summary
