"""The site's privacy ledger: on disk, cumulative across runs and restarts, readable by
`fedhaven ledger show`; and the noisy label prior the site keeps beside it, released once per
run even across a coordinator crash and resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from opacus.accountants import RDPAccountant

from fedhaven import protocol
from fedhaven.client.app import PRIVACY_STATE, handle_train, make_client_app, site_data
from fedhaven.config import DELTA, EPSILON_BUDGET, RESUME_MAY_CHANGE, STATE_DIR, Config
from fedhaven.errors import FedhavenError
from fedhaven.models import adapter_state, build_model
from fedhaven.privacy import (
    LABEL_PRIOR,
    LEDGER_FILE,
    PRIOR_FILE,
    Ledger,
    PriorStore,
    epsilon_of,
    prior_noise,
    run_identity,
)
from fedhaven.training import round_plan


def instruction(cfg: Config, server_round: int) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: protocol.to_record(adapter_state(build_model(cfg))),
            protocol.CONFIG: protocol.train_config(server_round),
        }
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_entries_round_trip_and_history_concatenates_releases(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "site")
    assert ledger.entries() == [] and ledger.history() == []
    ledger.append({"round": 1, "releases": [[8.0, 1.0, 1], [0.9, 0.5, 4]]})
    ledger.append({"round": 2, "releases": [[0.9, 0.5, 4]]})
    assert [e["round"] for e in ledger.entries()] == [1, 2]
    assert ledger.history() == [(8.0, 1.0, 1), (0.9, 0.5, 4), (0.9, 0.5, 4)]
    assert len((tmp_path / "site" / LEDGER_FILE).read_text().splitlines()) == 2


def test_a_torn_last_line_is_ignored_but_a_corrupt_middle_line_is_an_error(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    ledger.append({"round": 1, "releases": [[1.0, 0.5, 2]]})
    with ledger.path.open("a") as f:
        f.write('{"round": 2, "relea')  # the site crashed mid-write: that update never left
    assert [e["round"] for e in ledger.entries()] == [1]


def test_an_append_after_a_torn_line_drops_the_fragment(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.append({"round": 1, "releases": [[1.0, 0.5, 2]]})
    with ledger.path.open("a") as f:
        f.write('{"round": 2, "relea')  # the site crashed mid-write
    ledger.append({"round": 2, "releases": [[1.0, 0.5, 2]]})  # the restarted site goes on
    # the fragment of the update that never left is dropped; the ledger stays readable
    assert [e["round"] for e in ledger.entries()] == [1, 2]
    assert len(ledger.path.read_text().splitlines()) == 2


def test_a_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.append({"round": 1, "releases": [[1.0, 0.5, 2]]})
    with ledger.path.open("a") as f:
        f.write('{"round": 2, "relea\n{"round": 3, "releases": []}\n')
    with pytest.raises(FedhavenError, match="line 2 is corrupt"):
        ledger.entries()


def test_epsilon_of_matches_a_fresh_opacus_accountant() -> None:
    history = [(8.0, 1.0, 1), (1.1, 0.25, 12)]
    acc = RDPAccountant()
    acc.history = list(history)
    assert epsilon_of(history, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert epsilon_of([], 1e-5) == 0.0


@pytest.mark.usefixtures("flower_identity")
def test_a_restarted_site_continues_from_its_ledger(tiny_cfg: Config, tmp_path: Path) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True})
    node = {"partition-id": 0, "num-partitions": 2, STATE_DIR: str(tmp_path)}
    eps = []
    for server_round in (1, 2, 3):
        # a fresh Context each round: the site process restarted and kept only its disk
        context = Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})
        reply = handle_train(instruction(cfg, server_round=server_round), context, cfg)
        eps.append(reply.content[protocol.METRICS][protocol.EPSILON])
    entries = Ledger(tmp_path).entries()
    assert [e["round"] for e in entries] == [1, 2, 3]
    assert [e["epsilon"] for e in entries] == eps
    assert 0 < eps[0] < eps[1] < eps[2]
    # ε after each round is over the whole on-disk history so far, as a fresh Opacus
    # accountant fed that history computes it
    history = [tuple(r) for e in entries for r in e["releases"]]
    for i, entry in enumerate(entries):
        upto = sum(len(e["releases"]) for e in entries[: i + 1])
        fresh = RDPAccountant()
        fresh.history = history[:upto]
        assert entry["epsilon"] == pytest.approx(fresh.get_epsilon(delta=cfg.privacy.delta))
    # the label histogram is a release too, recorded with the round that made it: once,
    # though each round's Context is fresh (the prior comes back from the site's disk)
    assert entries[0]["releases"][0] == [prior_noise(cfg.privacy), 1.0, 1]
    assert [len(e["releases"]) for e in entries] == [2, 1, 1]


def _ledger_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, "-m", "fedhaven.cli", "ledger", "show", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_ledger_show_json_totals_and_a_missing_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    history = [(8.0, 1.0, 1), (1.0, 0.5, 3)]
    for i, rel in enumerate(history, start=1):
        ledger.append(
            {
                "time": "2026-11-25T00:00:00+00:00",
                "run_id": 1,
                "round": i,
                "steps": rel[2],
                "sample_rate": rel[1],
                "noise_multiplier": rel[0],
                "delta": 1e-5,
                "releases": [list(rel)],
                "epsilon": epsilon_of(history[:i], 1e-5),
            }
        )
    out = _ledger_cli("--state", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["entries"]) == 2
    assert data["total"]["steps"] == 4
    assert data["total"]["epsilon"] == pytest.approx(epsilon_of(history, 1e-5))

    table = _ledger_cli("--state", str(tmp_path))
    assert table.returncode == 0 and "2 rounds, 4 steps" in table.stdout

    missing = _ledger_cli("--state", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: no privacy ledger")
    assert len(missing.stderr.strip().splitlines()) == 1


def _site(tmp_path: Path, **node: object) -> Context:
    base = {"partition-id": 0, "num-partitions": 2, STATE_DIR: str(tmp_path)}
    return Context(
        run_id=7, node_id=1, node_config={**base, **node}, state=RecordDict(), run_config={}
    )


def _refused(reply: Message, match: str) -> None:
    """A refusal: an error reply (code REFUSED) whose reason matches, and nothing else."""
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == protocol.REFUSED
    assert re.search(match, reply.error.reason), reply.error.reason


@pytest.mark.usefixtures("flower_identity")
def test_an_exhausted_budget_refuses_the_round_and_records_nothing(
    tiny_cfg: Config, tmp_path: Path
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True})
    context = _site(tmp_path, **{EPSILON_BUDGET: 1000.0})
    first = handle_train(instruction(cfg, 1), context, cfg)
    spent = first.content[protocol.METRICS][protocol.EPSILON]
    # the site lowers its own budget to just above what it has spent
    context = _site(tmp_path, **{EPSILON_BUDGET: spent * 1.01})
    reply = handle_train(instruction(cfg, 2), context, cfg)
    _refused(reply, r"budget exhausted: spent ε=\d.*allowed ε=\d")
    assert len(Ledger(tmp_path).entries()) == 1  # the refused round left no entry


@pytest.mark.usefixtures("flower_identity")
def test_the_budget_check_predicts_exactly_what_the_round_releases(
    tiny_cfg: Config, tmp_path: Path
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True})
    train, _ = site_data(cfg, _site(tmp_path).node_config)
    planned = round_plan(cfg, len(train), release_prior=True).releases
    handle_train(instruction(cfg, 1), _site(tmp_path, **{EPSILON_BUDGET: 1000.0}), cfg)
    (entry,) = Ledger(tmp_path).entries()
    assert [tuple(r) for r in entry["releases"]] == planned


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize(
    ("flat", "node", "match"),
    [
        ({"privacy.enabled": False}, {EPSILON_BUDGET: 8.0}, "the run turns DP off"),
        ({"privacy.enabled": True}, {EPSILON_BUDGET: 8.0, STATE_DIR: None}, "no state-dir"),
    ],
)
def test_a_site_with_a_budget_refuses_what_it_cannot_account(
    tiny_cfg: Config, tmp_path: Path, flat: dict, node: dict, match: str
) -> None:
    cfg = tiny_cfg.replace(**flat)
    context = _site(tmp_path, **node)
    if node.get(STATE_DIR, "") is None:
        del context.node_config[STATE_DIR]
    _refused(handle_train(instruction(cfg, 1), context, cfg), match)
    assert not (tmp_path / LEDGER_FILE).exists()


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize(
    "coordinator",
    [
        {"privacy.epsilon": 100.0},  # raise the budget
        {"privacy.prior-noise": 0.5},  # cut the label histogram's noise
        {"privacy.delta": 0.5},  # a δ that makes any σ look cheap
        {"privacy.enabled": False},  # no noise at all
    ],
)
def test_a_coordinator_config_cannot_raise_the_budget_or_cut_the_noise(
    tiny_cfg: Config, tmp_path: Path, coordinator: dict, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True, **coordinator})
    context = _site(tmp_path, **{EPSILON_BUDGET: 8.0, DELTA: 1e-5})
    with caplog.at_level("WARNING", logger="fedhaven.client.app"):
        reply = handle_train(instruction(cfg, 1), context, cfg)
    _refused(reply, "refused|budget exhausted|no noise level|alone spends")
    assert any("round 1 refused" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / LEDGER_FILE).exists()


@pytest.mark.usefixtures("flower_identity")
def test_the_ledger_entry_is_on_disk_before_the_reply_is_sent(
    tiny_cfg: Config, tmp_path: Path
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True})
    seen: list[tuple[int, float]] = []

    def failing_send(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)  # the reply as it would be handed to the transport
        seen.append(
            (len(Ledger(tmp_path).entries()), reply.content[protocol.METRICS][protocol.EPSILON])
        )
        raise ConnectionError("the link to the coordinator dropped")

    app = make_client_app(cfg, mods=[failing_send])
    with pytest.raises(ConnectionError):
        app(instruction(cfg, 1), _site(tmp_path))
    ((entries_at_send, epsilon),) = seen
    assert entries_at_send == 1
    assert PriorStore(tmp_path).load(cfg, run_id=7) is not None  # the prior too, before it left
    (entry,) = Ledger(tmp_path).entries()  # the spent budget stays spent
    assert entry["epsilon"] == epsilon and entry["round"] == 1


# --- the label prior on the site's disk ----------------------------------------------------


def _prior_released(entry: dict) -> bool:
    return any(r[1:] == [1.0, 1] for r in entry["releases"])  # the histogram: rate 1, 1 step


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize(
    ("second_run", "run_id", "reused"),
    [
        # a coordinator crash, then federation.resume: a new Flower run of the same run
        (
            {
                "federation.resume": True,
                "federation.out-dir": "moved-run-dir",
                "federation.round-timeout": 60.0,
            },
            8,
            True,
        ),
        ({}, 7, True),  # the same Flower run: the site process restarted
        ({}, 8, False),  # a new run of the same config, not a resume
        ({"federation.resume": True, "federation.out-dir": "d", "train.seed": 1}, 8, False),
    ],
    ids=["resumed", "site-restarted", "new-run", "resumed-other-config"],
)
def test_the_stored_prior_is_reused_by_the_same_run_only(
    tiny_cfg: Config, tmp_path: Path, second_run: dict, run_id: int, reused: bool
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True})
    handle_train(instruction(cfg, 1), _site(tmp_path), cfg)
    store = PriorStore(tmp_path)
    first = store.load(cfg, run_id=7)
    assert first is not None and len(first) == 3 and sum(first) == pytest.approx(1.0)
    # a fresh Context: the node's run memory is gone, its disk is not
    again = cfg.replace(**second_run)
    context = Context(
        run_id=run_id,
        node_id=1,
        node_config=_site(tmp_path).node_config,
        state=RecordDict(),
        run_config={},
    )
    reply = handle_train(instruction(again, 2), context, again)
    assert not reply.has_error()
    entries = Ledger(tmp_path).entries()
    assert [_prior_released(e) for e in entries] == [True, not reused]
    # ε after round 2 counts exactly the releases made: one histogram, or two
    history = [tuple(r) for e in entries for r in e["releases"]]
    assert entries[-1]["epsilon"] == pytest.approx(epsilon_of(history, cfg.privacy.delta))
    now = store.load(again, run_id=run_id)
    assert (now == first) is reused  # a new release replaced the stored prior


@pytest.mark.usefixtures("flower_identity")
def test_a_site_without_a_state_dir_keeps_the_prior_in_memory_only(
    tiny_cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True})
    monkeypatch.chdir(tmp_path)
    context = Context(
        run_id=7,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    handle_train(instruction(cfg, 1), context, cfg)
    assert LABEL_PRIOR in context.state[PRIVACY_STATE]
    assert list(tmp_path.rglob(PRIOR_FILE)) == []


def test_the_run_identity_ignores_exactly_what_a_resume_may_change(tiny_cfg: Config) -> None:
    changed = {
        "federation.resume": True,
        "federation.round-timeout": 5.0,
        "federation.rejoin-wait": 30.0,
        "federation.out-dir": "elsewhere",
        "federation.site-cpus": 1,
    }
    assert set(changed) == set(RESUME_MAY_CHANGE)  # a new one: add it here
    base = run_identity(tiny_cfg)
    assert run_identity(tiny_cfg.replace(**changed)) == base
    for key, value in {"train.seed": 1, "privacy.prior-noise": 4.0, "federation.rounds": 9}.items():
        assert run_identity(tiny_cfg.replace(**{key: value})) != base, key


@pytest.mark.parametrize(
    "text",
    [
        '{"run_identity": "x", "run_id": 7, "prior": [0.5, 0.5',  # torn
        '{"run_id": 7, "prior": [0.5, 0.5]}',  # no run identity
        '{"run_identity": "x", "run_id": 7, "prior": [0.5, -0.5]}',  # not a distribution
        '{"run_identity": "x", "run_id": 7, "prior": [true, 0.5]}',
        '{"run_identity": "x", "run_id": 7, "prior": []}',
        "[1, 2]",
    ],
)
def test_a_corrupt_stored_prior_is_a_one_line_error_naming_the_file_and_the_fix(
    tiny_cfg: Config, tmp_path: Path, text: str
) -> None:
    (tmp_path / PRIOR_FILE).write_text(text)
    with pytest.raises(FedhavenError) as e:
        PriorStore(tmp_path).load(tiny_cfg, run_id=7)
    message = str(e.value)
    assert "\n" not in message
    assert str(tmp_path / PRIOR_FILE) in message and "is corrupt" in message
    assert "delete it" in message


def test_saving_replaces_the_file_whole_and_leaves_no_temporary(
    tiny_cfg: Config, tmp_path: Path
) -> None:
    store = PriorStore(tmp_path / "state")  # the folder is created on the first save
    store.save(tiny_cfg, 7, [0.25, 0.25, 0.5])
    store.save(tiny_cfg, 7, [0.5, 0.25, 0.25])
    assert store.load(tiny_cfg, run_id=7) == [0.5, 0.25, 0.25]
    assert [p.name for p in (tmp_path / "state").iterdir()] == [PRIOR_FILE]
