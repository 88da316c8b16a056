"""The demo presets: each is a valid run config of its task, flags override it, and an
unknown name is an error naming the ones there are."""

from __future__ import annotations

import pytest

from fedhaven.config import RECIPE, from_flat, keys, recipe
from fedhaven.errors import FedhavenError
from fedhaven.presets import PRESETS, preset
from fedhaven.tasks import get_task


@pytest.mark.parametrize(("name", "task"), [("instruct", "causal-lm"), ("digits", "image-cls")])
def test_each_preset_is_a_valid_config_of_its_task(name: str, task: str) -> None:
    cfg = from_flat(preset(name))
    assert cfg.model.task == task
    assert get_task(cfg).name == task
    assert cfg.privacy.enabled  # the demos run with DP on


def test_instruct_partitions_rows_not_labels() -> None:
    # the instruction set has no label column: a label partition would be refused
    assert from_flat(preset("instruct")).data.partition_scheme == ("iid", None)


def test_digits_labels_are_the_ten_digits() -> None:
    assert from_flat(preset("digits")).data.label_names == [str(d) for d in range(10)]


@pytest.mark.parametrize("private", [True, False])
def test_digits_trains_with_the_recipe_with_and_without_dp(private: bool) -> None:
    # its own rates and steps were tuned to DP and diverged without it
    flat = {**preset("digits"), keys.PRIVACY_ENABLED: private}
    train = from_flat(flat).to_flat()
    assert {k: train[k] for k in RECIPE} == {k: recipe(k, private) for k in RECIPE}


def test_a_preset_is_a_copy() -> None:
    p = preset("digits")
    p["federation.rounds"] = 99
    assert PRESETS["digits"]["federation.rounds"] != 99


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(FedhavenError, match=r"unknown preset 'poems': use one of digits, instruct"):
        preset("poems")
