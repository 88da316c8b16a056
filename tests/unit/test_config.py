"""fedhaven.config: defaults, validation (one error type naming the key), flat and TOML forms."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedhaven.config import RECIPE, Config, from_flat, load_toml, valid_keys
from fedhaven.errors import FedhavenError
from fedhaven.tasks import get_task

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_defaults_parse() -> None:
    cfg = from_flat({})
    assert cfg == Config()
    assert from_flat(Config().to_flat()) == cfg
    assert cfg.privacy.enabled is True  # private unless asked otherwise
    assert cfg.data.label_names == ["negative", "neutral", "positive"]  # the bundled set's
    assert cfg.data.partition_scheme[0] in ("iid", "dirichlet", "column")
    assert cfg.lora.targets


@pytest.mark.parametrize(
    ("layers", "indices"), [("", None), ("3", [3]), ("0, 1", [0, 1]), ("-1", [-1])]
)
def test_layer_indices(layers: str, indices: list[int] | None) -> None:
    assert from_flat({"lora.layers": layers}).lora.layer_indices == indices


def test_auto_lora_settings_take_the_tasks_defaults_and_explicit_ones_stay() -> None:
    defaults = ("q_proj,v_proj", "", "-1")
    auto = from_flat({}).lora.resolved(*defaults)
    assert (auto.targets, auto.saved_modules, auto.layer_indices) == (
        ["q_proj", "v_proj"],
        [],
        [-1],
    )
    mine = from_flat({"lora.target-modules": "query", "lora.layers": ""}).lora.resolved(*defaults)
    assert (mine.targets, mine.saved_modules, mine.layer_indices) == (["query"], [], None)


def test_own_data_needs_its_own_test_set() -> None:
    with pytest.raises(FedhavenError, match=r"'data\.test-path'"):
        from_flat({"data.path": "mine.csv"})
    cfg = from_flat({"data.path": "mine.csv", "data.test-path": "mine-test.csv"})
    assert cfg.data.test_path == "mine-test.csv"


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().lora.r = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("privacy.epsilon", 0),
        ("privacy.epsilon", -1.0),
        ("privacy.delta", 0.0),
        ("privacy.delta", 1.0),
        ("privacy.delta", -1e-5),
        ("privacy.delta", 1.5),
        ("privacy.max-grad-norm", 0),
        ("privacy.prior-noise", -2.0),
        ("privacy.accountant", "gdp-ish"),
        ("model.task", "token-cls"),
        ("model.image-size", 4),
        ("model.max-new-tokens", 0),
        ("lora.layers", "last"),
        ("lora.r", 0),
        ("lora.r", -2),
        ("lora.alpha", 0),
        ("lora.dropout", 1.0),
        ("lora.target-modules", " , "),
        ("lora.layers", "a,b"),
        ("federation.fraction-train", 0.0),
        ("federation.fraction-train", 1.5),
        ("federation.fraction-evaluate", 1.1),
        ("federation.rounds", 0),
        ("federation.sites", 0),
        ("federation.min-sites", 0),
        ("federation.rejoin-wait", -1.0),
        ("data.partition", "dirichlet:-1"),
        ("data.partition", "dirichlet:0"),
        ("data.partition", "dirichlet:abc"),
        ("data.partition", "foo"),
        ("data.partition", "column:"),
        ("data.partition", "iid:3"),
        ("data.labels", "positive"),
        ("data.labels", "a,b,a"),
        ("data.val-fraction", 1.0),
        ("data.text-column", ""),
        ("model.max-length", 4),
        ("model.pooling", "max"),
        ("model.head-init", "zeros"),
        ("model.label-prompt", "This review is"),
        ("model.label-prompt", "{} or {}"),
        ("train.schedule", "cosine"),
        ("train.learning-rate", 0),
        ("train.batch-size", 0),
        ("train.local-epochs", 0),
        ("train.local-steps", -1),
        # wrong types
        ("lora.r", "abc"),
        ("lora.r", 2.5),
        ("lora.r", True),
        ("privacy.epsilon", "lots"),
        ("privacy.enabled", 1),
        ("privacy.enabled", "yes"),
        ("data.path", 3),
    ],
)
def test_bad_value_raises_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(FedhavenError) as e:
        from_flat({key: value})
    assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize(
    "other", [{"model.pooling": "cls"}, {"model.task": "causal-lm"}, {"model.task": "image-cls"}]
)
def test_label_head_init_needs_the_mean_pooling_text_head(other: dict[str, str]) -> None:
    with pytest.raises(FedhavenError, match=r"'model\.head-init' = 'labels'.*mean-pooling"):
        from_flat({"model.head-init": "labels", **other})
    from_flat({"model.head-init": "random", **other})


def test_unknown_key_raises_naming_it() -> None:
    with pytest.raises(FedhavenError, match=r"unknown config key 'lora\.rank'"):
        from_flat({"lora.rank": 4})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lora.r", "4", 4),
        ("lora.r", 4.0, 4),
        ("privacy.epsilon", 3, 3.0),
        ("privacy.epsilon", "2.5", 2.5),
        ("privacy.enabled", "false", False),
        ("privacy.enabled", "True", True),
        ("privacy.enabled", False, False),
    ],
)
def test_coercion_of_good_values(key: str, value: object, expected: object) -> None:
    got = from_flat({key: value}).to_flat()[key]
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(
    ("partition", "scheme"),
    [
        ("iid", ("iid", None)),
        ("dirichlet:0.5", ("dirichlet", 0.5)),
        ("column:site", ("column", "site")),
    ],
)
def test_partition_scheme(partition: str, scheme: tuple[str, object]) -> None:
    assert from_flat({"data.partition": partition}).data.partition_scheme == scheme


def test_flat_round_trip() -> None:
    cfg = from_flat(
        {"lora.r": 4, "privacy.epsilon": 3.0, "data.partition": "iid", "lora.layers": "0,1"}
    )
    assert cfg != Config()
    flat = cfg.to_flat()
    assert sorted(flat) == sorted(valid_keys())
    assert from_flat(flat) == cfg
    assert flat["lora.r"] == 4
    assert cfg.lora.layer_indices == [0, 1]


def test_replace_changes_only_the_given_keys() -> None:
    cfg = Config()
    new = cfg.replace(**{"lora.r": cfg.lora.r + 1, "federation.rounds": cfg.federation.rounds + 2})
    assert new.lora.r == cfg.lora.r + 1
    assert new.federation.rounds == cfg.federation.rounds + 2
    assert cfg == Config()  # the original is untouched
    changed = {k for k, v in new.to_flat().items() if cfg.to_flat()[k] != v}
    assert changed == {"lora.r", "federation.rounds"}


def test_replace_validates() -> None:
    with pytest.raises(FedhavenError, match=r"'lora\.r'"):
        Config().replace(**{"lora.r": 0})


def test_load_toml_nested(tmp_path: Path) -> None:
    p = tmp_path / "run.toml"
    p.write_text(
        '[lora]\nr = 4\ntarget-modules = "query"\n\n'
        "[privacy]\nepsilon = 2.0\nenabled = false\n\n"
        '[data]\npartition = "iid"\n'
    )
    flat = load_toml(p)
    assert flat == {
        "lora.r": 4,
        "lora.target-modules": "query",
        "privacy.epsilon": 2.0,
        "privacy.enabled": False,
        "data.partition": "iid",
    }
    cfg = from_flat(flat)
    assert (cfg.lora.r, cfg.privacy.enabled, cfg.lora.targets) == (4, False, ["query"])


def test_load_toml_pyproject_style(tmp_path: Path) -> None:
    p = tmp_path / "pyproject.toml"
    p.write_text(
        '[project]\nname = "x"\n\n'
        '[tool.flwr.app]\npublisher = "me"\n\n'
        '[tool.flwr.app.config]\n"lora.r" = 2\n"federation.rounds" = 3\n'
    )
    assert load_toml(p) == {"lora.r": 2, "federation.rounds": 3}


def test_load_toml_missing_and_invalid(tmp_path: Path) -> None:
    with pytest.raises(FedhavenError, match="not found"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nr = ")
    with pytest.raises(FedhavenError, match="not valid TOML"):
        load_toml(bad)


def test_pyproject_run_config_matches_config_defaults() -> None:
    """``flwr run .`` reads [tool.flwr.app.config]: it must list every key with its default."""
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = Config().to_flat()
    assert set(table) == set(defaults), (
        f"missing {sorted(set(defaults) - set(table))}, extra {sorted(set(table) - set(defaults))}"
    )
    for key, value in defaults.items():
        if key in RECIPE:  # resolved by privacy.enabled, so the deployed run's too
            assert table[key] == "auto", key
            continue
        assert table[key] == value, key
        assert isinstance(table[key], bool) == isinstance(value, bool), key
    assert from_flat(table) == Config()
    no_dp = from_flat({**table, "privacy.enabled": False})
    assert no_dp == from_flat({"privacy.enabled": False}) != Config()


def test_the_recipe_follows_privacy_unless_given() -> None:
    """ "auto" (or no value) takes the recipe's value with or without DP; a value given stays,
    whatever privacy.enabled says; replace keeps the resolved values unless told "auto"."""
    dp, no_dp = from_flat({}).train, from_flat({"privacy.enabled": "false"}).train
    assert (dp.learning_rate, dp.batch_size, dp.local_epochs) == (0.6, 256, 1)
    assert (no_dp.learning_rate, no_dp.batch_size, no_dp.local_epochs) == (0.03, 32, 2)
    assert (no_dp.lora_learning_rate, no_dp.logit_adjustment) == (0.01, 0.5)
    assert from_flat({"train.learning-rate": "auto"}).train == dp
    given = from_flat({"privacy.enabled": False, "train.batch-size": 256}).train
    assert (given.batch_size, given.learning_rate) == (256, 0.03)
    kept = Config().replace(**{"privacy.enabled": False})
    assert kept.train == dp
    again = Config().replace(**{"privacy.enabled": False, "train.learning-rate": "auto"})
    assert again.train.learning_rate == 0.03 and again.train.batch_size == 256


def test_server_momentum_is_on_without_dp_and_off_under_any_dp() -> None:
    def momentum(**flat: object) -> float:
        return from_flat(flat).federation.server_momentum

    assert momentum() == 0.0  # the sites' noise would ride along
    assert momentum(**{"privacy.enabled": False}) == 0.5
    # central DP noises the plain mean, so "auto" is off there; a value given is refused
    central = {"privacy.enabled": False, "privacy.central": "server-fixed"}
    assert momentum(**central) == 0.0
    with pytest.raises(FedhavenError, match=r"'federation\.server-momentum' = 0\.5"):
        from_flat({**central, "federation.server-momentum": 0.5})
    assert momentum(**{"privacy.enabled": False, "federation.server-momentum": 0.2}) == 0.2


def test_no_dp_preset_is_a_valid_config_without_privacy() -> None:
    preset = Path(__file__).resolve().parents[2] / "presets" / "no-dp.toml"
    cfg = from_flat(load_toml(preset))
    assert cfg.privacy.enabled is False
    assert cfg.lora.layer_indices is None  # every layer
    assert cfg.train.batch_size < Config().train.batch_size


def test_named_keys_are_config_keys() -> None:
    from fedhaven.config import keys

    named = [v for k, v in vars(keys).items() if k.isupper()]
    assert named and set(named) <= set(valid_keys())


@pytest.mark.parametrize(
    ("flat", "refused"),
    [
        ({"model.task": "causal-lm"}, True),  # its "auto" trains no head
        ({}, False),  # seq-cls: the classifier
        ({"lora.modules-to-save": ""}, True),
    ],
)
def test_probe_rounds_need_a_head_the_task_trains(flat: dict[str, str], refused: bool) -> None:
    task = get_task(from_flat({**flat, "train.probe-rounds": 1}))
    if refused:
        with pytest.raises(FedhavenError, match=r"'train\.probe-rounds' = 1: .*no head"):
            task.check()
    else:
        task.check()
    get_task(from_flat(flat)).check()  # no probe rounds: nothing to refuse
