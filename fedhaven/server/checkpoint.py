"""The coordinator's checkpoint, and resuming a run from it (Flower has none: flwr issue #599).

After every round the coordinator writes ``checkpoint/`` in the run directory:
``manifest.json`` (round, flat run config, metrics history, strategy / early-stopping state,
the last evaluation) and one ``arrays-rNNNN.npz`` (the global adapter, the best round's
adapter, the server optimizer's moments: every array of the state, keys and dtypes kept).
Each file is written to a temporary file in the same directory, fsync'ed and renamed into
place, the manifest last: a crash at any point leaves the previous checkpoint whole.
``federation.resume = true`` goes on from it with the same run config: the rounds already
done are not repeated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedhaven.config import RESUME_MAY_CHANGE, Config
from fedhaven.errors import FedhavenError
from fedhaven.fileio import write_atomic
from fedhaven.run_record import CHECKPOINT_DIR

log = logging.getLogger(__name__)

#: The checkpoint's manifest in :data:`CHECKPOINT_DIR` (replaced last).
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 1
_ARRAY = "__ndarray__"  # marks a reference to an array of the checkpoint's .npz in the JSON


def _pack(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``obj`` as JSON, its arrays moved to ``arrays`` and replaced by references."""
    if isinstance(obj, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = obj
        return {_ARRAY: name}
    if isinstance(obj, Mapping):
        return {str(k): _pack(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_pack(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _unpack(obj: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            return arrays[obj[_ARRAY]]
        return {k: _unpack(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, arrays) for v in obj]
    return obj


def save_checkpoint(directory: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (JSON values and NumPy arrays, nested; ``state["round"]`` an int) as
    the checkpoint in ``directory``, replacing the previous one only once it is complete."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    packed = _pack(state, arrays)
    name = f"arrays-r{int(state['round']):04d}.npz"
    write_atomic(directory / name, lambda f: np.savez(f, allow_pickle=False, **arrays))
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "arrays_file": name,
        "arrays_sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest(),
        "state": packed,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    write_atomic(directory / MANIFEST, lambda f: f.write(text.encode()))
    for old in directory.iterdir():  # earlier rounds' arrays, and temporaries of a crash
        if old.name != name and (old.name.startswith("arrays-") or old.suffix == ".tmp"):
            with contextlib.suppress(OSError):
                old.unlink()


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The state :func:`save_checkpoint` wrote to ``directory``; ``None`` if there is none."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    fix = "restore the run directory from a backup, or run without federation.resume"
    try:
        manifest = json.loads(path.read_text())
        data = (directory / manifest["arrays_file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FedhavenError(f"checkpoint in {directory} is unreadable ({e}): {fix}") from e
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise FedhavenError(
            f"checkpoint in {directory} has format {manifest.get('format')!r}, this fedhaven "
            f"reads {CHECKPOINT_FORMAT}: resume with the fedhaven version that wrote it"
        )
    if hashlib.sha256(data).hexdigest() != manifest.get("arrays_sha256"):
        what = manifest["arrays_file"]
        raise FedhavenError(f"checkpoint in {directory}: {what} is corrupt: {fix}")
    with np.load(directory / manifest["arrays_file"], allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return _unpack(manifest["state"], arrays)


def check_resumable(saved: Mapping[str, Any], cfg: Config, directory: Path) -> None:
    """Raise unless ``cfg`` is the run config the checkpoint in ``directory`` was written
    with (:data:`RESUME_MAY_CHANGE` aside)."""
    now = cfg.to_flat()
    missing = "(absent)"
    for key in dict.fromkeys([*saved, *now]):
        if key in RESUME_MAY_CHANGE:
            continue
        before, after = saved.get(key, missing), now.get(key, missing)
        if before != after:
            raise FedhavenError(
                f"the checkpoint in {directory} is of another run config: '{key}' was "
                f"{before!r}, now {after!r}; resume with the run's own config, or start a new "
                "run in another federation.out-dir"
            )


def resume_state(out: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint in run directory ``out``, once checked to be of ``cfg``'s run."""
    saved = load_checkpoint(out / CHECKPOINT_DIR)
    if saved is None:
        raise FedhavenError(f"no checkpoint in {out}: run without federation.resume")
    check_resumable(saved["config"], cfg, out)
    return saved


def drop_checkpoint(out: Path) -> None:
    """A fresh run in a run directory that holds an earlier run's checkpoint: from now on the
    directory is this run's, and a resume must not pick up the other one."""
    directory = out / CHECKPOINT_DIR
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return
    log.warning(
        "%s holds a checkpoint of an earlier run: this run starts over and replaces it "
        "(federation.resume = true would have gone on from it)",
        out,
    )
    manifest.unlink()  # first: without it the arrays are no checkpoint
    for old in directory.glob("arrays-*.npz"):
        old.unlink()


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


class Stateful(Protocol):
    """A piece of the run that a checkpoint saves and a resume restores (the strategy, the
    early-stopping counter)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class RunState:
    """The coordinator's run after its last round: what a checkpoint holds.

    ``strategy`` and ``stopper`` are live objects: :meth:`state_dict` reads their state and
    :meth:`load_state_dict` puts the saved state back into them.
    """

    strategy: Stateful
    stopper: Stateful
    config: dict[str, Any]  #: the flat run config, which a resume must match
    arrays: ArrayRecord  #: the global adapter after the last round evaluated
    round: int = 0  #: rounds done
    stopped_early: bool = False
    #: with early stopping: the best round, its adapter and its evaluation on the test set
    best_round: int = 0
    best_arrays: ArrayRecord | None = None
    best_eval: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)  #: the last round's evaluation
    history: list[dict[str, Any]] = field(default_factory=list)  #: metrics.jsonl's lines

    def state_dict(self) -> dict[str, Any]:
        best = None
        if self.best_arrays is not None:
            best = {
                "round": self.best_round,
                "arrays": _numpy(self.best_arrays),
                "eval": self.best_eval,
            }
        return {
            "round": self.round,
            "stopped_early": self.stopped_early,
            "config": self.config,
            "arrays": _numpy(self.arrays),
            "strategy": self.strategy.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "best": best,
            "last_eval": dict(self.last_eval),
            "history": self.history,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpoint's state; ``config`` stays this run's own (a resume may change
        some keys: :data:`RESUME_MAY_CHANGE`), which the next checkpoint records."""
        self.round, self.stopped_early = int(state["round"]), bool(state["stopped_early"])
        self.arrays = _record(state["arrays"])
        self.strategy.load_state_dict(state["strategy"])
        self.stopper.load_state_dict(state["early_stopping"])
        best = state["best"]
        if best is not None:
            self.best_round = int(best["round"])
            self.best_arrays, self.best_eval = _record(best["arrays"]), dict(best["eval"])
        self.last_eval = dict(state["last_eval"])
        self.history = list(state["history"])

    def save(self, out: Path) -> Path:
        """Write the checkpoint into run directory ``out``; returns its folder."""
        save_checkpoint(out / CHECKPOINT_DIR, self.state_dict())
        return out / CHECKPOINT_DIR


class Resumed(Strategy):
    """``strategy`` as Flower's round loop sees it in a resumed run.

    ``Strategy.start`` always counts rounds from 1; a resumed run gives it the rounds left
    and this wrapper shows ``strategy`` round ``r + offset`` for Flower's round ``r``. The
    sites' learning-rate schedule and privacy ledger read the round from the train config,
    which Flower's ``configure_train`` sets from the round it is given: they see it too.
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        super().__init__()
        self.strategy, self.offset = strategy, offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()
