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
import json
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
from fedhaven.config import (
    DATA_PATH,
    DELTA,
    EPSILON_BUDGET,
    LORA_RANK,
    NUM_PARTITIONS,
    PARTITION_ID,
    STATE_DIR,
    Config,
    from_flat,
)
from fedhaven.datacheck import DataReport, DataRules
from fedhaven.encoded_cache import EncodedCache, cache_key
from fedhaven.errors import FedhavenError
from fedhaven.models import adapter_state, build_model, refactor_lora, set_adapter_state
from fedhaven.privacy import Ledger, PriorStore, Release, epsilon_of
from fedhaven.tasks import get_task
from fedhaven.training import default_device, evaluate, round_releases, train_round

#: A simulated site's own node settings by partition id (the harness stands in for operators).
SiteSettings = Mapping[int, Mapping[str, Any]]
# context.state record holding this site's accountant history across rounds.
PRIVACY_STATE = "privacy"
ACCOUNTANT = "accountant"
LABEL_PRIOR = "label-prior"
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


def node_settings(context: Context, sites: SiteSettings | None = None) -> dict[str, Any]:
    """The site's own settings: its node config, plus a simulated partition's settings."""
    node = dict(context.node_config)
    if sites and PARTITION_ID in node:
        node.update(sites.get(int(node[PARTITION_ID]), {}))
    return node


def with_site_rank(cfg: Config, node: Mapping[str, Any]) -> Config:
    """``cfg`` at the site's own LoRA rank (node config ``lora-rank``), where it sets one.

    α moves with the rank (α·rank / lora.r) so that α/r, PEFT's scale of B·A, stays the
    run's: the coordinator then adds up the sites' products unscaled
    (:mod:`fedhaven.strategies.flexlora`).
    """
    if LORA_RANK not in node:
        return cfg
    raw, lora = node[LORA_RANK], cfg.lora
    rank = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    if isinstance(raw, str) and raw.strip().isdigit():
        rank = int(raw)
    if rank is None or rank < 1:
        raise FedhavenError(
            f"site setting '{LORA_RANK}' = {raw!r} is invalid: give the site's LoRA rank, "
            "a whole number >= 1"
        )
    if rank == lora.r:
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
    if DATA_PATH in node:
        rules = DataRules.from_node(node)
        return (DATA_PATH, str(node[DATA_PATH]), str(node.get(STATE_DIR, "")), rules)
    return (PARTITION_ID, int(node[PARTITION_ID]), int(node[NUM_PARTITIONS]), None)


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
    return AuditLog(Path(str(node[STATE_DIR])) / auditlog.AUDIT_FILE) if STATE_DIR in node else None


def _global_model(cfg: Config, msg: Message):
    model = build_model(cfg, default_device())
    state = protocol.from_record(msg.content[protocol.ARRAYS])
    if cfg.federation.strategy == "flexlora":  # the global rank, until the coordinator knows ours
        state = refactor_lora(state, cfg.lora.r)
    set_adapter_state(model, state)
    return model


def check_budget(
    cfg: Config,
    node: Mapping[str, Any],
    history: list[Release] | None,
    num_examples: int,
    has_prior: bool,
) -> None:
    """Refuse, before training, a round that would take the site past its own budget.

    The budget (ε, δ) is the site's node config; the coordinator's run config cannot raise
    it, and a run config that turns DP off is refused outright.
    """
    allowed, delta = float(node[EPSILON_BUDGET]), float(node.get(DELTA, cfg.privacy.delta))
    if history is None:
        raise FedhavenError(
            f"node config sets {EPSILON_BUDGET} but no {STATE_DIR}: the budget "
            "needs a ledger on the site's disk"
        )
    if not cfg.privacy.enabled:
        raise FedhavenError(f"refused: the run turns DP off, but this site allows ε={allowed:g}")
    planned = round_releases(cfg, num_examples, release_prior=not has_prior)
    spent = epsilon_of(history, delta, cfg.privacy.accountant)
    after = epsilon_of([*history, *planned], delta, cfg.privacy.accountant)
    if after > allowed:
        raise FedhavenError(
            f"privacy budget exhausted: spent ε={spent:.2f}, this round would reach "
            f"ε={after:.2f}, allowed ε={allowed:g} at δ={delta:g}"
        )


def handle_train(
    msg: Message,
    context: Context,
    run: Config | None,
    sites: SiteSettings | None = None,
) -> Message:
    entered = time.time()
    node = node_settings(context, sites)
    cfg = with_site_rank(site_config(context, run), node)
    train = site_train(cfg, node)
    model = _global_model(cfg, msg)
    state = context.state.get(PRIVACY_STATE) or ConfigRecord()
    config = msg.content[protocol.CONFIG]
    server_round = int(config.get(protocol.SERVER_ROUND, 1))
    proximal_mu = float(config.get(protocol.PROXIMAL_MU, 0.0))  # FedProx sends it
    ledger = Ledger(str(node[STATE_DIR])) if STATE_DIR in node else None
    audit = site_audit_log(node)
    history = ledger.history() if ledger is not None else None  # read the file once
    # The run's label prior: in the node's run memory, else on the site's disk (a resumed
    # run, or a restarted site, has lost that memory but must not release it again).
    priors = PriorStore(str(node[STATE_DIR])) if STATE_DIR in node else None
    prior = json.loads(str(state[LABEL_PRIOR])) if LABEL_PRIOR in state else None
    if prior is None and priors is not None:
        prior = priors.load(cfg, context.run_id)
    report = site_data_report(cfg, node)
    if audit is not None and report is not None and DATA_LOGGED not in state:
        # once per run: the counts of the checks, on the site's disk (state-dir) only
        audit.record(auditlog.DATA_CHECKED, run_id=context.run_id, **report.to_dict())
        state[DATA_LOGGED] = True
    if EPSILON_BUDGET in node:  # before any training: a refused round touches nothing
        try:
            check_budget(cfg, node, history, len(train), has_prior=prior is not None)
        except FedhavenError as e:
            # A deliberate answer, not a crash: an error reply naming spent and allowed ε.
            log.warning("round %d refused: %s", server_round, e)
            if audit is not None:
                audit.record(
                    auditlog.REFUSED, run_id=context.run_id, round=server_round, reason=str(e)
                )
            return Message(Error(code=protocol.REFUSED, reason=str(e)), reply_to=msg)
    if history is not None:  # the site's whole history, across runs and restarts
        accountant_state = {"history": history, "mechanism": cfg.privacy.accountant}
    elif ACCOUNTANT in state:  # this run's history, kept in the node's context
        accountant_state = json.loads(str(state[ACCOUNTANT]))
    else:
        accountant_state = None
    train_started = time.perf_counter()
    result = train_round(
        model,
        train,
        cfg,
        server_round=server_round,
        accountant_state=accountant_state,
        label_prior=prior,
        proximal_mu=proximal_mu,
    )
    train_s = time.perf_counter() - train_started
    if ledger is not None and result.releases:
        # On the site's disk before the update can leave it.
        ledger.record(
            run_id=context.run_id,
            server_round=server_round,
            steps=result.steps,
            noise_multiplier=float(result.noise_multiplier or 0.0),
            delta=cfg.privacy.delta,
            releases=result.releases,
            epsilon=float(result.epsilon or 0.0),
        )
    # Site-private state: never sent, kept for this site's next round of the run.
    if priors is not None and prior is None and result.label_prior is not None:
        # after the ledger counted its release, before the update (which used it) leaves
        priors.save(cfg, context.run_id, result.label_prior)
    if result.label_prior is not None:
        state[LABEL_PRIOR] = json.dumps(result.label_prior)
    if result.accountant_state is not None:
        state[ACCOUNTANT] = json.dumps(result.accountant_state)
    if state:
        context.state[PRIVACY_STATE] = state
    metrics: dict[str, float] = {
        protocol.NUM_EXAMPLES: result.num_examples,
        protocol.TRAIN_LOSS: result.loss,
        protocol.STEPS: result.steps,
        protocol.SITE_WEIGHT: 1.0,
        protocol.DATA_ROWS: site_row_count(cfg, node),
        protocol.DATA_FINGERPRINT: site_fingerprint(cfg, node),
        **data_metrics(report),
    }
    if result.epsilon is not None:
        metrics[protocol.EPSILON] = result.epsilon
        metrics[protocol.NOISE_MULTIPLIER] = float(result.noise_multiplier or 0.0)
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
            # where the message's time went at the site (a deployed site: one process each)
            timings={
                "process_s": round(entered - psutil.Process().create_time(), 3),
                "handler_s": round(time.time() - entered, 3),
                "train_s": round(train_s, 3),
            },
        )
    return Message(content, reply_to=msg)


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
