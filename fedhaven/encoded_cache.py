"""A deployed site's encoded rows, kept in its state directory between messages.

A deployed site runs each message in a new process, which would read its file, tokenise it
and (seq-cls) run the frozen prefix over every row again: about as long as the round's
training. The encoded splits are a function of the file's bytes, the run's model / data /
LoRA settings (the prefix depends on which layers LoRA adapts), the base model's files and
this code, so they are saved under a hash of exactly those and loaded, memory-mapped, by the
next message. They never leave the site; deleting ``cache/`` in the state directory only
costs the next message the time to encode again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

import fedhaven
from fedhaven.config import Config, keys
from fedhaven.fileio import write_atomic

CACHE_DIR = "cache"
#: Bump when what encode() produces changes shape or meaning without a version bump.
FORMAT = 1
#: Run settings that change a site's rows, their split, or their encoding.
_SECTIONS = ("model.", "data.", "lora.")
_ALSO = (keys.TRAIN_SEED,)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_stamp(model_dir: Path) -> list[tuple[str, int, int]]:
    # The base model's files by size and time: a model replaced at the same path is new.
    return sorted(
        (p.name, st.st_size, st.st_mtime_ns)
        for p in model_dir.iterdir()
        if p.is_file() and (st := p.stat())
    )


def cache_key(cfg: Config, data_path: Path, model_dir: Path, extra: str = "") -> str:
    """The hash that names a site's encoded rows (``extra``: the site's own data rules)."""
    settings = {k: v for k, v in cfg.to_flat().items() if k.startswith(_SECTIONS) or k in _ALSO}
    what = {
        "format": FORMAT,
        "fedhaven": fedhaven.__version__,
        "torch": torch.__version__,
        "data": _file_digest(data_path),
        "settings": settings,
        "model": _model_stamp(model_dir),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


class EncodedCache:
    """One site's encoded splits and their row counts, under one key in its state dir."""

    def __init__(self, state_dir: Path, key: str) -> None:
        self.dir = state_dir / CACHE_DIR
        self.key = key

    def _path(self, name: str) -> Path:
        return self.dir / f"{self.key}.{name}.pt"

    def load(self, name: str) -> Any | None:
        """What :meth:`save` stored under ``name``; None if absent or unreadable."""
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True, mmap=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            return None  # a torn or foreign file: encode again and overwrite it

    def save(self, name: str, value: Any) -> None:
        """Whole or not at all: a message that stops half-way leaves no torn entry."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self._path(name), lambda f: torch.save(value, f))

    def load_split(self, split: int) -> TensorDataset | None:
        tensors = self.load(f"split{split}")
        return None if tensors is None else TensorDataset(*tensors)

    def save_split(self, split: int, ds: TensorDataset) -> None:
        self.save(f"split{split}", list(ds.tensors))
