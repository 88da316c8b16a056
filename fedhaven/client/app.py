"""The site's Flower ClientApp: thin train / evaluate handlers around fedhaven.training.

A site's data comes from its own node config (``data-path``) in a deployment, or from its
partition of the run's dataset in a simulation (``partition-id`` / ``num-partitions``, set by
Flower's simulation engine). A simulated site's own settings (state dir, budget) are given to
the ClientApp by the harness, per partition, never through the coordinator's run config.
The privacy accountant's history comes from the site's ledger when the node config names a
``state-dir`` (cumulative over runs and restarts), else from the node's ``context.state``
(cumulative over the rounds of a run).

With a ``state-dir`` the site also keeps its own audit log there
(:data:`fedhaven.auditlog.AUDIT_FILE`): one ``sent`` event per training update (run, round,
tensor count and bytes, metric names, ε after the round) and one ``refused`` event per round
its budget refused, each on disk before the reply leaves, like the ledger's entry. Never data.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import psutil
from datasets import Dataset
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch.utils.data import TensorDataset

from fedhaven import auditlog, protocol
from fedhaven import data as fdata
from fedhaven.auditlog import AuditLog
from fedhaven.client.mods import allowlist_mod, central_clipping_mod, secure_aggregation_mod
from fedhaven.config import DATA_PATH, LORA_RANK, PARTITION_ID, Config, from_flat
from fedhaven.datacheck import DataReport, DataRules
from fedhaven.encoded_cache import EncodedCache, cache_key
from fedhaven.errors import FedhavenError
from fedhaven.models import adapter_state, build_model, refactor_lora, set_adapter_state
from fedhaven.privacy import RoundPlan, SitePrivacy
from fedhaven.site_config import SiteConfig
from fedhaven.tasks import get_task
from fedhaven.training import RoundResult, default_device, evaluate, round_plan, train_round

#: A simulated site's own settings by partition id (the harness stands in for operators).
SiteSettings = Mapping[int, SiteConfig]
# context.state record holding this site's privacy memory (fedhaven.privacy.SitePrivacy).
PRIVACY_STATE = "privacy"
COUNTS = "counts"  # the encoded-rows cache's entry for a site's counts and data report
DATA_LOGGED = "data-checked"  # the run's data_checked audit event is written


log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _run_config(flat: tuple[tuple[str, Any], ...]) -> Config:
    return from_flat(dict(flat))


def site_config(context: Context, cfg: Config | None) -> Config:
    """The run's typed config: the harness's own, or (deployed) the run config Flower gives
    the message, parsed once per run and process."""
    return cfg or _run_config(tuple(sorted(context.run_config.items())))


def node_settings(context: Context, sites: SiteSettings | None = None) -> SiteConfig:
    """The site's own settings, checked: its node config, plus a simulated partition's."""
    node = dict(context.node_config)
    if sites and PARTITION_ID in node:
        node.update(sites.get(int(node[PARTITION_ID]), {}))
    return SiteConfig.from_node(node)


def with_site_rank(cfg: Config, node: Mapping[str, Any]) -> Config:
    """``cfg`` at the site's own LoRA rank (node config ``lora-rank``), where it sets one.

    α moves with the rank (α·rank / lora.r) so that α/r, PEFT's scale of B·A, stays the
    run's: the coordinator then adds up the sites' products unscaled
    (:mod:`fedhaven.strategies.flexlora`).
    """
    rank, lora = SiteConfig.from_node(node).lora_rank, cfg.lora
    if rank is None or rank == lora.r:
        return cfg
    if cfg.federation.strategy != "flexlora":
        raise FedhavenError(
            f"site setting '{LORA_RANK}' = {rank} differs from the run's lora.r = {lora.r}; "
            "only federation.strategy=flexlora aggregates mixed ranks: drop the site's "
            f"{LORA_RANK}, or run flexlora"
        )
    if rank > lora.r:
        raise FedhavenError(
            f"site setting '{LORA_RANK}' = {rank} is above the run's lora.r = {lora.r}: the "
            "global adapter keeps rank lora.r, so the rest would be cut every round; use at "
            f"most {lora.r}, or run with lora.r = {rank}"
        )
    alpha, rest = divmod(lora.alpha * rank, lora.r)
    if rest:
        raise FedhavenError(
            f"site setting '{LORA_RANK}' = {rank}: keeping the run's scale lora.alpha / lora.r "
            f"= {lora.alpha}/{lora.r} needs alpha {lora.alpha * rank / lora.r:g} at this "
            "rank, not a whole number: run with lora.alpha a multiple of lora.r (e.g. 2·lora.r)"
        )
    return replace(cfg, lora=replace(lora, r=rank, alpha=alpha))


#: Sites one process keeps: a simulation's actor serves every site in turn, and a cache
#: smaller than its sites would miss on every round (LRU under cyclic access), so that the
#: frozen prefix would be computed again each round for every site.
SITES_CACHED = 128


@functools.lru_cache(maxsize=SITES_CACHED)
def _site_rows(
    cfg: Config, node_key: tuple[Any, ...]
) -> tuple[Dataset, Dataset, DataReport | None]:
    # Cached per process: a Ray actor serves many rounds of the same sites.
    kind, value, num, rules = node_key  # num: a site file's state dir (unused here)
    task = get_task(cfg)
    if kind == DATA_PATH:  # the site's own file, checked under its own rules
        return task.load_site(value, rules, cfg.train.seed)
    # a simulated partition of the run's data, checked as a whole when loaded
    full = task.load(cfg.data.path)
    train, val = fdata.simulated_sites(full, cfg.data, num, cfg.train.seed)[value]
    return train, val, None


@functools.lru_cache(maxsize=SITES_CACHED)
def _disk_cache(cfg: Config, node_key: tuple[Any, ...]) -> EncodedCache | None:
    # A deployed site with a state dir: each message is a new process, so the encoded rows
    # are kept on the site's disk (a simulation's actors keep them in memory instead).
    kind, value, state_dir, rules = node_key
    if kind != DATA_PATH or not state_dir:
        return None
    key = cache_key(cfg, Path(value), get_task(cfg).model_path(), extra=repr(rules))
    return EncodedCache(Path(state_dir), key)


@functools.lru_cache(maxsize=SITES_CACHED)
def _site_counts(cfg: Config, node_key: tuple[Any, ...]) -> tuple[int, int, DataReport | None]:
    """(rows, fingerprint, checks' report) of a site's training and validation rows."""
    cache = _disk_cache(cfg, node_key)
    if cache is not None and (kept := cache.load(COUNTS)) is not None:
        rows, fingerprint, report = kept
        return rows, fingerprint, None if report is None else DataReport(**report)
    train, val, report = _site_rows(cfg, node_key)
    fingerprint = fdata.fingerprint([*get_task(cfg).rows(train), *get_task(cfg).rows(val)])
    counts = (len(train) + len(val), fingerprint, report)
    if cache is not None:
        cache.save(COUNTS, [*counts[:2], None if report is None else asdict(report)])
    return counts


@functools.lru_cache(maxsize=2 * SITES_CACHED)
def _encoded(cfg: Config, node_key: tuple[Any, ...], split: int) -> TensorDataset:
    # Each split on first use: encoding can run most of the model (seq-cls's frozen prefix),
    # and a deployed site starts a process per message, whose evaluation needs only val.
    cache = _disk_cache(cfg, node_key)
    if cache is not None and (ds := cache.load_split(split)) is not None:
        return ds
    ds = get_task(cfg).encode(_site_rows(cfg, node_key)[split])
    if cache is not None:
        cache.save_split(split, ds)
    return ds


def _node_key(node: Mapping[str, Any]) -> tuple[Any, ...]:
    site = SiteConfig.from_node(node)
    if site.data_path is not None:
        rules = DataRules.from_node(site)
        return (DATA_PATH, site.data_path, site.state_dir or "", rules)
    return (PARTITION_ID, site.partition_id, site.num_partitions, None)


def site_train(cfg: Config, node: Mapping[str, Any]) -> TensorDataset:
    """The site's training rows, encoded for the task's model."""
    return _encoded(cfg, _node_key(node), 0)


def site_val(cfg: Config, node: Mapping[str, Any]) -> TensorDataset:
    """The site's validation rows, encoded for the task's model."""
    return _encoded(cfg, _node_key(node), 1)


def site_data(cfg: Config, node: Mapping[str, Any]) -> tuple[TensorDataset, TensorDataset]:
    """The site's (train, validation) rows, encoded for the task's model."""
    return site_train(cfg, node), site_val(cfg, node)


def site_row_count(cfg: Config, node: Mapping[str, Any]) -> int:
    """How many rows the site has (training and validation)."""
    return _site_counts(cfg, _node_key(node))[0]


def site_fingerprint(cfg: Config, node: Mapping[str, Any]) -> int:
    """48 bits of a hash of the site's rows (see :func:`fedhaven.data.fingerprint`)."""
    return _site_counts(cfg, _node_key(node))[1]


def site_data_report(cfg: Config, node: Mapping[str, Any]) -> DataReport | None:
    """What the checks of the site's own file found (``None``: a simulated partition, or a
    task without such checks)."""
    return _site_counts(cfg, _node_key(node))[2]


def data_metrics(report: DataReport | None) -> dict[str, float]:
    """The totals of a site's data checks that go into its reply, for the model card."""
    if report is None:
        return {}
    return {
        protocol.DATA_ROWS_IN: report.rows_in,
        protocol.DATA_DROPPED: report.rows_dropped,
        protocol.DATA_DUPLICATES: report.duplicates,
        protocol.DATA_SMALL_CLASSES: len(report.below_minimum),
    }


def site_audit_log(node: Mapping[str, Any]) -> AuditLog | None:
    """The site's own audit log, in its state dir (``None`` without one)."""
    state_dir = SiteConfig.from_node(node).state_dir
    return AuditLog(Path(state_dir) / auditlog.AUDIT_FILE) if state_dir is not None else None


def _global_model(cfg: Config, msg: Message):
    model = build_model(cfg, default_device())
    state = protocol.from_record(msg.content[protocol.ARRAYS])
    if cfg.federation.strategy == "flexlora":  # the global rank, until the coordinator knows ours
        state = refactor_lora(state, cfg.lora.r)
    set_adapter_state(model, state)
    return model


def _round_plan(cfg: Config, site: SiteConfig, privacy: SitePrivacy, n: int) -> RoundPlan | None:
    """The round's DP plan (``None``: no DP), σ solved once for the budget check and the
    round; a site with a budget refuses, before any training, a round past it."""
    budget = site.epsilon_budget is not None
    if budget:
        privacy.check_accountable()
    if not cfg.privacy.enabled:
        return None
    plan = round_plan(cfg, n, release_prior=privacy.prior is None)
    if budget:
        privacy.check_budget(plan)
    return plan


def _refuse(msg: Message, error: FedhavenError, audit: AuditLog | None, run_id: int) -> Message:
    """A deliberate answer, not a crash: an error reply naming spent and allowed ε."""
    server_round = int(msg.content[protocol.CONFIG].get(protocol.SERVER_ROUND, 1))
    log.warning("round %d refused: %s", server_round, error)
    if audit is not None:
        audit.record(auditlog.REFUSED, run_id=run_id, round=server_round, reason=str(error))
    return Message(Error(code=protocol.REFUSED, reason=str(error)), reply_to=msg)


def _train_metrics(
    cfg: Config, site: SiteConfig, result: RoundResult, report: DataReport | None
) -> dict[str, float]:
    metrics: dict[str, float] = {
        protocol.NUM_EXAMPLES: result.num_examples,
        protocol.TRAIN_LOSS: result.loss,
        protocol.STEPS: result.steps,
        protocol.SITE_WEIGHT: 1.0,
        protocol.DATA_ROWS: site_row_count(cfg, site),
        protocol.DATA_FINGERPRINT: site_fingerprint(cfg, site),
        **data_metrics(report),
    }
    if result.epsilon is not None:
        metrics[protocol.EPSILON] = result.epsilon
        metrics[protocol.NOISE_MULTIPLIER] = float(result.noise_multiplier or 0.0)
    return metrics


def handle_train(
    msg: Message,
    context: Context,
    run: Config | None,
    sites: SiteSettings | None = None,
) -> Message:
    entered = time.time()
    site = node_settings(context, sites)
    cfg = with_site_rank(site_config(context, run), site)
    train = site_train(cfg, site)
    model = _global_model(cfg, msg)
    memory = context.state.get(PRIVACY_STATE) or ConfigRecord()
    config = msg.content[protocol.CONFIG]
    server_round = int(config.get(protocol.SERVER_ROUND, 1))
    privacy = SitePrivacy(site, cfg, context.run_id, memory)
    audit = site_audit_log(site)
    report = site_data_report(cfg, site)
    if audit is not None and report is not None and DATA_LOGGED not in memory:
        # once per run: the counts of the checks, on the site's disk (state-dir) only
        audit.record(auditlog.DATA_CHECKED, run_id=context.run_id, **report.to_dict())
        memory[DATA_LOGGED] = True
    try:
        plan = _round_plan(cfg, site, privacy, len(train))
    except FedhavenError as e:
        if site.epsilon_budget is None:  # no budget to keep: not a refusal
            raise
        return _refuse(msg, e, audit, context.run_id)
    train_started = time.perf_counter()
    result = train_round(
        model,
        train,
        cfg,
        server_round=server_round,
        accountant_state=privacy.accountant_state(),
        label_prior=privacy.prior,
        noise_multiplier=None if plan is None else plan.noise_multiplier,
        proximal_mu=float(config.get(protocol.PROXIMAL_MU, 0.0)),  # FedProx sends it
    )
    train_s = time.perf_counter() - train_started
    privacy.record(result, server_round)  # on the site's disk before the update can leave it
    if memory:  # site-private, never sent: kept for this site's next round of the run
        context.state[PRIVACY_STATE] = memory
    metrics = _train_metrics(cfg, site, result, report)
    content = protocol.train_reply(adapter_state(model), metrics)
    if audit is not None:  # what leaves the site, on its disk before it leaves
        arrays = content[protocol.ARRAYS]
        audit.record(
            auditlog.SENT,
            run_id=context.run_id,
            round=server_round,
            tensors=len(arrays),
            bytes=protocol.record_nbytes(arrays),
            metrics=sorted(metrics),
            epsilon=result.epsilon,
            timings=_timings(entered, train_s),
        )
    return Message(content, reply_to=msg)


def _timings(entered: float, train_s: float) -> dict[str, float]:
    """Where the message's time went at the site (a deployed site: one process each)."""
    return {
        auditlog.PROCESS_S: round(entered - psutil.Process().create_time(), 3),
        auditlog.HANDLER_S: round(time.time() - entered, 3),
        auditlog.TRAIN_S: round(train_s, 3),
    }


def handle_evaluate(
    msg: Message,
    context: Context,
    run: Config | None,
    sites: SiteSettings | None = None,
) -> Message:
    node = node_settings(context, sites)
    cfg = with_site_rank(site_config(context, run), node)
    ev = evaluate(_global_model(cfg, msg), site_val(cfg, node), cfg)
    metrics: dict[str, float] = {protocol.NUM_EXAMPLES: ev["num_examples"]}
    if ev["num_examples"]:
        metrics |= {protocol.METRIC_KEYS[k]: ev[k] for k in get_task(cfg).metrics}
    content = protocol.evaluate_reply(metrics)
    return Message(content, reply_to=msg)


def make_client_app(
    cfg: Config | None = None,
    sites: SiteSettings | None = None,
    mods: Sequence[Mod] = (),
) -> ClientApp:
    """A ClientApp that runs ``cfg``; without one (``flwr run``), the run config Flower hands
    each message.

    ``fedhaven simulate`` passes its typed config (Flower's in-process simulation gives the
    apps an empty run config) and each simulated site's own settings as ``sites``. ``mods``
    wrap the allow-list: they see a reply only after it passed (a site's own audit hook, say).
    """
    # Every reply passes the outgoing allow-list on its way out of the site, after the
    # clipping that central DP with client-side clipping asks for. Outermost: SecAgg+, for
    # the rounds the coordinator runs under secure aggregation (it masks what passed).
    client = ClientApp(mods=[secure_aggregation_mod, *mods, allowlist_mod, central_clipping_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, cfg, sites)

    @client.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, cfg, sites)

    return client


app = make_client_app()
