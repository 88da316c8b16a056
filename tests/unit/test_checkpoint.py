"""The coordinator's checkpoint and resume: the files round-trip bit for bit, a crash while
writing leaves the previous checkpoint, a resume checks its config, and a run resumed after a
crash ends where the uninterrupted run ends (the sites driven in-process through a stub
Grid: no Ray)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from test_fedavg import FakeGrid, reply

from fedhaven import protocol
from fedhaven.client.app import handle_evaluate, handle_train
from fedhaven.config import Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.run_record import CHECKPOINT_DIR, METRICS_FILE
from fedhaven.server import checkpoint
from fedhaven.server.app import build_strategy, run_server
from fedhaven.server.checkpoint import (
    MANIFEST,
    Resumed,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from fedhaven.strategies import central_dp

pytestmark = pytest.mark.usefixtures("flower_identity")


def _state(round_: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"round": round_, "arrays": arrays, "history": [{"round": round_}], "best": None}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)  # keys, in order
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


# --- the files ------------------------------------------------------------------------------


def test_round_trip_keeps_keys_dtypes_and_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lora_a = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"
    arrays = {
        lora_a: rng.standard_normal((8, 32)).astype(np.float32),
        "classifier.modules_to_save.weight": rng.standard_normal((3, 32)).astype(np.float16),
        "a.float64": np.array([np.pi, -0.0, np.nextafter(1.0, 2.0)]),
        "b.int64": np.arange(5, dtype=np.int64),
        "c.bool": np.array([True, False]),
        "d.scalar": np.array(7.5, dtype=np.float32),
        "e.empty": np.zeros((0, 4), dtype=np.float32),
    }
    state = {
        **_state(3, arrays),
        "nested": {"moments": [None, {"w": arrays["a.float64"]}], "norm": 0.25, "ok": True},
        "text": "ε ≈ 8",
    }
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    _assert_same(loaded["arrays"], arrays)
    np.testing.assert_array_equal(loaded["nested"]["moments"][1]["w"], arrays["a.float64"])
    assert loaded["nested"]["moments"][0] is None
    assert loaded["nested"]["norm"] == 0.25 and loaded["nested"]["ok"] is True
    assert loaded["round"] == 3 and loaded["text"] == "ε ≈ 8"
    assert loaded["history"] == [{"round": 3}]
    # one manifest and one array file; nothing else left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays-r0003.npz", MANIFEST]


def test_a_later_checkpoint_replaces_the_earlier_one(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(1, {"w": np.zeros(2, np.float32)}))
    save_checkpoint(tmp_path, _state(2, {"w": np.ones(2, np.float32)}))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded["round"] == 2
    np.testing.assert_array_equal(loaded["arrays"]["w"], np.ones(2, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays-r0002.npz", MANIFEST]


def test_a_failed_manifest_write_leaves_the_previous_checkpoint_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = {"w": np.arange(4, dtype=np.float32)}
    save_checkpoint(tmp_path, _state(1, first))
    real = os.replace

    def crash_on_manifest(src: Any, dst: Any) -> None:
        if Path(dst).name == MANIFEST:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _state(2, {"w": np.full(4, 9.0, np.float32)}))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded["round"] == 1
    _assert_same(loaded["arrays"], first)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    # the next checkpoint that gets through tidies the orphaned array file away
    save_checkpoint(tmp_path, _state(2, {"w": np.full(4, 9.0, np.float32)}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays-r0002.npz", MANIFEST]


def test_a_failed_array_write_leaves_the_previous_checkpoint_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = {"w": np.arange(4, dtype=np.float32)}
    save_checkpoint(tmp_path, _state(1, first))

    def crash(*_: Any, **__: Any) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(checkpoint.np, "savez", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, _state(2, first))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays-r0001.npz", MANIFEST]


def test_no_checkpoint_loads_as_none_and_a_corrupt_one_is_a_user_error(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    assert load_checkpoint(tmp_path / "nope") is None
    save_checkpoint(tmp_path, _state(1, {"w": np.zeros(3, np.float32)}))
    npz = tmp_path / "arrays-r0001.npz"
    npz.write_bytes(npz.read_bytes()[:-5] + b"xxxxx")
    with pytest.raises(FedhavenError, match=r"arrays-r0001\.npz is corrupt: restore"):
        load_checkpoint(tmp_path)


# --- strategy state through a checkpoint ------------------------------------------------------


def _round(strategy: Any, server_round: int, sent: np.ndarray) -> np.ndarray:
    record = ArrayRecord({"w": torch.from_numpy(sent)})
    list(strategy.configure_train(server_round, record, ConfigRecord(), FakeGrid([1, 2])))
    replies = [
        reply(1, {"w": torch.from_numpy(sent + 0.3)}, num_examples=10, site_weight=1.0),
        reply(2, {"w": torch.from_numpy(sent - 0.1)}, num_examples=30, site_weight=1.0),
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays["w"].numpy()


def test_fedadam_moments_survive_a_checkpoint(tmp_path: Path) -> None:
    cfg = Config().replace(**{"federation.strategy": "fedadam", "federation.sites": 2})
    first = build_strategy(cfg)
    after_1 = _round(first, 1, np.zeros((2, 3), np.float32))
    save_checkpoint(tmp_path, {"round": 1, "strategy": first.state_dict()})
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    resumed = build_strategy(cfg)
    resumed.load_state_dict(loaded["strategy"])
    for name in ("m_t", "v_t"):
        _assert_same(getattr(resumed, name), getattr(first, name))
    np.testing.assert_array_equal(_round(resumed, 2, after_1), _round(first, 2, after_1))


@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive"])
def test_central_dp_accountant_and_clipping_bound_survive_a_checkpoint(
    tmp_path: Path, mode: str
) -> None:
    cfg = Config().replace(
        **{"privacy.central": mode, "privacy.central-clip": 0.1, "federation.sites": 2}
    )
    strategy, accountant = central_dp.wrap(build_strategy(cfg), cfg)
    zero = np.zeros((2, 2), np.float32)
    for server_round in (1, 2):
        _round(strategy, server_round, zero)  # two released rounds
    assert accountant is not None and accountant.num_releases == 2
    save_checkpoint(tmp_path, {"round": 2, "strategy": strategy.state_dict()})
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    resumed, restored = central_dp.wrap(build_strategy(cfg), cfg)
    assert restored is not None and restored.num_releases == 0
    resumed.load_state_dict(loaded["strategy"])
    assert restored.num_releases == 2
    assert restored.get_epsilon(cfg.privacy.delta) == accountant.get_epsilon(cfg.privacy.delta)
    assert resumed.clipping_norm == strategy.clipping_norm
    if mode == "server-adaptive":  # it moved, and the moved bound is what came back
        assert resumed.clipping_norm != 0.1


def test_a_stateless_rule_refuses_state_it_does_not_have() -> None:
    strategy = build_strategy(Config().replace(**{"federation.strategy": "fedmedian"}))
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        strategy.load_state_dict({"m_t": None})


# --- resume: config checks and round offsets --------------------------------------------------


def test_a_different_config_names_the_first_differing_key(tmp_path: Path) -> None:
    saved = Config().to_flat()
    now = Config().replace(**{"train.learning-rate": 0.1, "federation.rounds": 9})
    with pytest.raises(FedhavenError) as err:
        check_resumable(saved, now, tmp_path)
    msg = str(err.value)
    assert "'train.learning-rate' was 0.6, now 0.1" in msg and "\n" not in msg
    assert "another federation.out-dir" in msg
    # what a resume may change
    check_resumable(
        saved,
        Config().replace(
            **{
                "federation.resume": True,
                "federation.out-dir": str(tmp_path),
                "federation.round-timeout": 5.0,
            }
        ),
        tmp_path,
    )


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = Config().replace(**{"federation.resume": True, "federation.out-dir": str(tmp_path)})
    with pytest.raises(
        FedhavenError, match=r"^no checkpoint in .*: run without federation\.resume$"
    ):
        run_server(None, cfg)  # type: ignore[arg-type]  # fails before it needs the grid
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_resume_needs_an_out_dir() -> None:
    with pytest.raises(FedhavenError, match=r"'federation\.resume'.*federation\.out-dir"):
        Config().replace(**{"federation.resume": True})


@pytest.mark.parametrize("bad", [0, -1.0])
def test_round_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(FedhavenError, match=r"'federation\.round-timeout'"):
        Config().replace(**{"federation.round-timeout": bad})


def test_a_resumed_strategy_sees_the_runs_round_numbers() -> None:
    # Flower's loop counts 1, 2, ... again; the strategy, and through the train config the
    # sites (learning-rate schedule, ledger), see 3, 4, ...
    base = build_strategy(Config().replace(**{"federation.sites": 2}))
    resumed = Resumed(base, 2)
    record = ArrayRecord({"w": torch.zeros(2)})
    msgs = list(resumed.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2])))
    assert {m.content[protocol.CONFIG][protocol.SERVER_ROUND] for m in msgs} == {3}
    replies = [reply(n, {"w": torch.ones(2)}, num_examples=5, train_loss=0.1) for n in (1, 2)]
    arrays, _ = resumed.aggregate_train(1, replies)
    assert arrays is not None and set(base.round_stats) == {3}
    assert set(base.site_metrics) == {3}
    msgs = list(resumed.configure_evaluate(1, record, ConfigRecord(), FakeGrid([1, 2])))
    assert {m.content[protocol.CONFIG][protocol.SERVER_ROUND] for m in msgs} == {3}


# --- resume end to end, in-process -----------------------------------------------------------


class SitesGrid:
    """A Grid whose sites are fedhaven's ClientApp handlers, called in this process.

    Replies come back in node order (Flower samples nodes in random order, and a float sum
    in another order is another float). Records each ``timeout`` it is given.
    """

    def __init__(self, flat: dict[str, Any], state_root: Path, sites: int = 2) -> None:
        self.cfg = from_flat(flat)  # the handlers take the typed config
        self.contexts = {
            i + 1: Context(
                run_id=1,
                node_id=i + 1,
                node_config={
                    "partition-id": i,
                    "num-partitions": sites,
                    "state-dir": str(state_root / f"site-{i}"),
                },
                state=RecordDict(),
                run_config={},
            )
            for i in range(sites)
        }
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        self.timeouts.append(timeout)
        out = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            context = self.contexts[msg.metadata.dst_node_id]
            handle = handle_train if msg.metadata.message_type == MessageType.TRAIN else None
            out.append((handle or handle_evaluate)(msg, context, self.cfg))
        return out


class _Killed(Exception):
    pass


def _kill_after(last_round: int):
    def progress(line: dict[str, Any]) -> None:
        if line["round"] == last_round:
            raise _Killed

    return progress


def _adapter(out: Path) -> dict[str, np.ndarray]:
    loaded = load_checkpoint(out / CHECKPOINT_DIR)
    assert loaded is not None
    return loaded["arrays"]


def _rounds(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["fedadam", "fedavg"])
def test_a_run_resumed_after_a_crash_ends_where_the_uninterrupted_run_ends(
    tmp_path: Path, tiny_flat: dict[str, object], strategy: str
) -> None:
    # FedAdam's moments and FedAvg's server momentum must come back; no DP (the run is then
    # deterministic)
    flat = {
        **tiny_flat,
        "privacy.enabled": False,
        "federation.strategy": strategy,
        "federation.server-momentum": 0.5,
        "federation.server-learning-rate": 0.05,
        "federation.rounds": 3,
        "federation.round-timeout": 42.0,
    }
    whole = {**flat, "federation.out-dir": str(tmp_path / "whole")}
    grid = SitesGrid(whole, tmp_path / "whole-sites")
    expected = run_server(grid, from_flat(whole))  # type: ignore[arg-type]
    assert set(grid.timeouts) == {42.0}  # federation.round-timeout reaches Flower

    out = tmp_path / "crashed"
    crashed = {**flat, "federation.out-dir": str(out)}
    grid = SitesGrid(crashed, tmp_path / "crashed-sites")
    with pytest.raises(_Killed):
        run_server(grid, from_flat(crashed), progress=_kill_after(1))  # type: ignore[arg-type]
    assert _rounds(out) == [1] and not (out / "summary.json").exists()

    resumed = {**crashed, "federation.resume": True}
    grid = SitesGrid(resumed, tmp_path / "crashed-sites")  # new run, fresh node state
    seen: list[int] = []
    summary = run_server(grid, from_flat(resumed), progress=lambda line: seen.append(line["round"]))  # type: ignore[arg-type]
    assert seen == [2, 3]  # round 1 is not repeated
    assert len(grid.timeouts) == 4  # two rounds, train and evaluate each
    assert _rounds(out) == [1, 2, 3]
    assert summary["rounds"] == 3 and summary["resumed_after_round"] == 1
    assert len(summary["sites"]) == 2
    assert expected["rounds"] == 3 and expected["resumed_after_round"] is None
    # the same model, bit for bit, and the same evaluation
    _assert_same(_adapter(out), _adapter(tmp_path / "whole"))
    assert summary["global"] == expected["global"]
    for a, b in zip(
        (out / METRICS_FILE).read_text().splitlines(),
        (tmp_path / "whole" / METRICS_FILE).read_text().splitlines(),
        strict=True,
    ):
        a_line, b_line = json.loads(a), json.loads(b)
        assert a_line["global"] == b_line["global"]

    # resuming a run that has ended trains nothing and writes the same summary again
    grid = SitesGrid(resumed, tmp_path / "crashed-sites")
    again = run_server(grid, from_flat(resumed))  # type: ignore[arg-type]
    assert grid.timeouts == []
    assert again["rounds"] == 3 and again["global"] == summary["global"]
    assert _rounds(out) == [1, 2, 3]
