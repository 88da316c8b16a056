"""bench/presets.py's centralized run without DP: the recipe's settings a preset leaves to
the recipe take their no-DP values; those the preset sets stay (configs only, no runs)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import presets as bench_presets
from fedhaven.config import from_flat, keys, recipe
from fedhaven.presets import PRESETS


def _run_config(name: str) -> dict[str, object]:
    """What a DP run of the preset records: every setting resolved, the recipe's with DP."""
    return from_flat(PRESETS[name]).to_flat()


def test_without_dp_gives_the_recipe_its_no_dp_values() -> None:
    cfg = from_flat(bench_presets.without_dp(_run_config("digits"), PRESETS["digits"]))
    assert not cfg.privacy.enabled
    assert cfg.train.learning_rate == recipe(keys.TRAIN_LEARNING_RATE, False)
    assert cfg.train.batch_size == recipe(keys.TRAIN_BATCH_SIZE, False)
    assert cfg.train.learning_rate != _run_config("digits")[keys.TRAIN_LEARNING_RATE]


def test_without_dp_keeps_what_the_preset_sets() -> None:
    flat = _run_config("instruct")
    cfg = from_flat(bench_presets.without_dp(flat, PRESETS["instruct"]))
    assert cfg.train.lora_learning_rate == PRESETS["instruct"][keys.TRAIN_LORA_LEARNING_RATE]
    assert cfg.train.batch_size == PRESETS["instruct"][keys.TRAIN_BATCH_SIZE]
    assert cfg.model.max_length == flat[keys.MODEL_MAX_LENGTH]  # not a recipe key: as run
