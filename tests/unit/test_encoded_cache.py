"""A deployed site's encoded rows are kept in its state dir (fedhaven.encoded_cache): the
next message, a new process, loads them instead of encoding its file again; anything that
changes the rows or their encoding names another entry."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedhaven.client import app as capp
from fedhaven.config import DATA_PATH, MIN_PER_CLASS, STATE_DIR, Config
from fedhaven.encoded_cache import CACHE_DIR, cache_key
from fedhaven.tasks import get_task


def _new_process() -> None:
    # what a deployed site's next message starts with: no in-memory caches
    for f in (capp._site_rows, capp._disk_cache, capp._site_counts, capp._encoded):
        f.cache_clear()


@pytest.fixture
def site(tmp_path: Path, tiny_csv: Path) -> dict[str, str]:
    data = tmp_path / "site.csv"
    shutil.copy(tiny_csv, data)
    return {DATA_PATH: str(data), STATE_DIR: str(tmp_path / "state")}


def test_the_next_message_loads_the_encoded_rows_instead_of_encoding_again(
    tiny_cfg: Config, site: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _new_process()
    train, val = capp.site_data(tiny_cfg, site)
    rows, fingerprint = capp.site_row_count(tiny_cfg, site), capp.site_fingerprint(tiny_cfg, site)
    report = capp.site_data_report(tiny_cfg, site)
    assert report is not None and report.rows_kept == rows
    assert len(list((Path(site[STATE_DIR]) / CACHE_DIR).glob("*.pt"))) == 3  # 2 splits, counts

    _new_process()
    task_type = type(get_task(tiny_cfg))

    def no_encoding(*_: object, **__: object) -> None:
        raise AssertionError("encoded again although the state dir holds the rows")

    monkeypatch.setattr(task_type, "encode", no_encoding)
    monkeypatch.setattr(task_type, "load", no_encoding)  # not even read: the key is the hash
    train2, val2 = capp.site_data(tiny_cfg, site)
    for a, b in zip([*train.tensors, *val.tensors], [*train2.tensors, *val2.tensors], strict=True):
        assert torch.equal(a, b)
    assert capp.site_row_count(tiny_cfg, site) == rows == len(train) + len(val)
    assert capp.site_fingerprint(tiny_cfg, site) == fingerprint
    assert capp.site_data_report(tiny_cfg, site) == report  # the checks' counts, kept too


def test_other_data_rules_at_the_site_name_another_entry(
    tiny_cfg: Config, site: dict[str, str]
) -> None:
    _new_process()
    capp.site_train(tiny_cfg, site)
    _new_process()
    capp.site_train(tiny_cfg, {**site, MIN_PER_CLASS: 1})
    assert len(list((Path(site[STATE_DIR]) / CACHE_DIR).glob("*.split0.pt"))) == 2


def test_a_simulated_site_or_one_without_a_state_dir_writes_nothing(
    tiny_cfg: Config, site: dict[str, str], tmp_path: Path
) -> None:
    _new_process()
    capp.site_data(tiny_cfg, {DATA_PATH: site[DATA_PATH]})
    assert not (Path(site[STATE_DIR]) / CACHE_DIR).exists()


def test_a_torn_entry_is_encoded_again_and_replaced(tiny_cfg: Config, site: dict[str, str]) -> None:
    _new_process()
    train = capp.site_train(tiny_cfg, site)
    entry = next((Path(site[STATE_DIR]) / CACHE_DIR).glob("*.split0.pt"))
    entry.write_bytes(entry.read_bytes()[:100])
    _new_process()
    again = capp.site_train(tiny_cfg, site)
    assert all(torch.equal(a, b) for a, b in zip(train.tensors, again.tensors, strict=True))
    assert entry.stat().st_size > 100


def test_the_key_follows_the_file_the_encoding_settings_and_the_model(
    tiny_cfg: Config, site: dict[str, str], tiny_model_dir: Path
) -> None:
    data = Path(site[DATA_PATH])
    key = cache_key(tiny_cfg, data, tiny_model_dir)
    assert cache_key(tiny_cfg, data, tiny_model_dir) == key
    # training settings do not change the rows: the same entry
    other_lr = replace(tiny_cfg, train=replace(tiny_cfg.train, learning_rate=0.123))
    assert cache_key(other_lr, data, tiny_model_dir) == key
    changed = {
        "max-length": replace(tiny_cfg, model=replace(tiny_cfg.model, max_length=24)),
        "lora layers": replace(tiny_cfg, lora=replace(tiny_cfg.lora, layers="0")),
        "seed": replace(tiny_cfg, train=replace(tiny_cfg.train, seed=7)),
    }
    for what, cfg in changed.items():
        assert cache_key(cfg, data, tiny_model_dir) != key, what
    original = data.read_bytes()
    data.write_bytes(original + b"\n")
    assert cache_key(tiny_cfg, data, tiny_model_dir) != key, "file bytes"
