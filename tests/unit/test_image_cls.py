"""image-cls on a tiny ResNet and a tiny ViT built from configs: loading (folder per class,
table, bundled digits) and its errors, encoding, LoRA defaults, BatchNorm under DP, predict,
the digits export and the bundled model's preparation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from typer.testing import CliRunner

from fedhaven import training
from fedhaven.config import Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.models import adapter_state, build_model
from fedhaven.tasks import digits_resnet as dr
from fedhaven.tasks import get_task
from fedhaven.tasks import image_cls as ic
from fedhaven.training import train_round

LABELS = ["dark", "mid", "light"]
SIZE = 16  # the tiny ViT's image size (conftest.py: tiny_vit_dir)


def _image(label: int, seed: int, mode: str = "L") -> Image.Image:
    """An 8×8 image whose brightness says its label (so the classes are learnable)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(40 + 80 * label, 20, (8, 8)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").convert(mode)


def _folder(root: Path, per_label: int = 6) -> Path:
    for y, name in enumerate(LABELS):
        (root / name).mkdir(parents=True)
        for i in range(per_label):
            # one RGB image per class: converted to the model's channels like the rest
            _image(y, 10 * y + i, "RGB" if i == 0 else "L").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-resnet")
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    model = ResNetForImageClassification(config)
    # BatchNorm with non-trivial running statistics, as after pretraining
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(d)
    processor = ViTImageProcessorPil(
        size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    processor.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vit_dir(tiny_vit_dir: Path) -> Path:
    return tiny_vit_dir


def _cfg(model_dir: Path, data: Path | str, **flat: object) -> Config:
    return from_flat(
        {
            "model.task": "image-cls",
            "model.path": str(model_dir),
            "model.image-size": SIZE,
            "data.path": str(data),
            "data.test-path": str(data),
            "data.labels": ",".join(LABELS),
            "train.batch-size": 6,
            "train.eval-batch-size": 8,
            "federation.rounds": 2,
            **flat,
        }
    )


@pytest.fixture(scope="module")
def resnet_cfg(resnet_dir: Path, image_dir: Path) -> Config:
    return _cfg(resnet_dir, image_dir)


@pytest.fixture(scope="module")
def vit_cfg(vit_dir: Path, image_dir: Path) -> Config:
    return _cfg(vit_dir, image_dir)


# --- LoRA defaults ---------------------------------------------------------------------


def test_lora_defaults_follow_the_architecture(resnet_cfg: Config, vit_cfg: Config) -> None:
    resnet, vit = get_task(resnet_cfg).lora, get_task(vit_cfg).lora
    assert resnet.targets == ["convolution"]
    assert vit.targets == ["q_proj", "v_proj"]
    for lora in (resnet, vit):
        assert lora.saved_modules == ["classifier"]
        assert lora.layer_indices is None  # every layer


def test_lora_defaults_for_an_unknown_architecture_ask_for_target_modules(
    tiny_model_dir: Path, image_dir: Path
) -> None:
    with pytest.raises(FedhavenError, match=r"model type 'bert'.*set lora.target-modules"):
        _ = get_task(_cfg(tiny_model_dir, image_dir)).lora
    # given explicitly, the model type does not matter
    lora = get_task(_cfg(tiny_model_dir, image_dir, **{"lora.target-modules": "query"})).lora
    assert lora.targets == ["query"]


def test_lora_adapts_every_resnet_convolution(resnet_cfg: Config) -> None:
    model = build_model(resnet_cfg)
    convs = [n for n, m in model.named_modules() if n.endswith(".convolution.base_layer")]
    plain = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and n.endswith("convolution")
    ]
    assert len(convs) == 6 and not plain  # stem, 4 in the stages, 1 shortcut
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "classifier" in n for n in trainable)


# --- loading ---------------------------------------------------------------------------


def test_folder_per_class(resnet_cfg: Config, image_dir: Path) -> None:
    ds = get_task(resnet_cfg).load(str(image_dir))
    assert len(ds) == 18
    assert ds["label"] == [0] * 6 + [1] * 6 + [2] * 6  # data.labels order, not folder order
    assert ds[ic.FILE][:2] == ["dark/0.png", "dark/1.png"]
    assert ds[ic.IMAGE][1].size == (8, 8)


def test_label_ids_follow_data_labels_not_folder_names(resnet_dir: Path, image_dir: Path) -> None:
    cfg = _cfg(resnet_dir, image_dir, **{"data.labels": "light,mid,dark"})
    ds = get_task(cfg).load(str(image_dir))
    by_folder = {f.split("/")[0]: y for f, y in zip(ds[ic.FILE], ds["label"], strict=True)}
    assert by_folder == {"light": 0, "mid": 1, "dark": 2}


def test_table_with_relative_paths(resnet_cfg: Config, image_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"image": f"../{image_dir.name}/{name}/{i}.png", "rating": name, "hospital": i % 2}
        for name in LABELS
        for i in range(2)
    ]
    table = tmp_path / "t" / "images.csv"
    table.parent.mkdir()
    pd.DataFrame(rows).to_csv(table, index=False)
    # the table's folder, not the working directory, is where relative paths start
    (tmp_path / image_dir.name).symlink_to(image_dir)
    cfg = resnet_cfg.replace(**{"data.label-column": "rating"})
    ds = get_task(cfg).load(str(table))
    assert ds["label"] == [0, 0, 1, 1, 2, 2]
    assert ds["hospital"] == [0, 1] * 3  # other columns stay, for column partitioning
    assert ds[ic.FILE][0] == f"../{image_dir.name}/dark/0.png"
    pixels = np.asarray(ds[ic.IMAGE][0])
    assert np.array_equal(pixels, np.asarray(Image.open(image_dir / "dark" / "0.png")))


def test_drug_review_table_is_rejected_for_image_cls(resnet_cfg: Config, tiny_csv: Path) -> None:
    # the seq-cls demo data: no image column
    with pytest.raises(FedhavenError, match=r"column 'image' not found.*set data.image-column"):
        get_task(resnet_cfg).load(str(tiny_csv))


def _write_table(tmp_path: Path, rows: list[dict[str, object]]) -> str:
    p = tmp_path / "images.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_table_errors(resnet_cfg: Config, image_dir: Path, tmp_path: Path) -> None:
    task = get_task(resnet_cfg.replace(**{"data.label-column": "y"}))
    good = str(image_dir / "dark" / "0.png")
    with pytest.raises(FedhavenError, match=r"column 'y' not found.*set data.label-column"):
        task.load(_write_table(tmp_path, [{"image": good}]))
    with pytest.raises(FedhavenError, match=r"image file '.*nope.png' not found"):
        task.load(_write_table(tmp_path, [{"image": "nope.png", "y": "dark"}]))
    with pytest.raises(FedhavenError, match=r"label 'purple' is not in the configured label set"):
        task.load(_write_table(tmp_path, [{"image": good, "y": "purple"}]))
    with pytest.raises(FedhavenError, match=r"empty or non-text value"):
        task.load(_write_table(tmp_path, [{"image": "", "y": "dark"}]))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FedhavenError, match=r"broken.png' could not be read"):
        task.load(_write_table(tmp_path, [{"image": "broken.png", "y": "dark"}]))
    # prediction needs no label column
    assert len(task.load(_write_table(tmp_path, [{"image": good}]), labeled=False)) == 1


def test_folder_errors(resnet_cfg: Config, tmp_path: Path) -> None:
    task = get_task(resnet_cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedhavenError, match=r"has no images"):
        task.load(str(empty))
    (empty / "dark").mkdir()
    with pytest.raises(FedhavenError, match=r"has no images"):
        task.load(str(empty))
    other = _folder(tmp_path / "other", per_label=1)
    (other / "purple").mkdir()
    with pytest.raises(FedhavenError, match=r"subfolder 'purple' is not a label"):
        task.load(str(other))
    loose = _folder(tmp_path / "loose", per_label=1)
    _image(0, 0).save(loose / "stray.png")
    with pytest.raises(FedhavenError, match=r"'stray.png' is not in a label subfolder"):
        task.load(str(loose))
    broken = _folder(tmp_path / "broken", per_label=1)
    (broken / "mid" / "bad.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(FedhavenError, match=r"bad.png' could not be read"):
        task.load(str(broken))


def test_flat_folder_for_prediction(resnet_cfg: Config, tmp_path: Path) -> None:
    for i in range(3):
        _image(i, i).save(tmp_path / f"{i}.png")
    task = get_task(resnet_cfg)
    ds = task.load(str(tmp_path), labeled=False)
    assert ds[ic.FILE] == ["0.png", "1.png", "2.png"] and "label" not in ds.column_names
    with pytest.raises(FedhavenError, match=r"not in a label subfolder"):
        task.load(str(tmp_path))  # training needs labels


def test_bundled_digits_splits_are_disjoint_and_fixed() -> None:
    splits = {s: ic.digits_indices(s) for s in ic.DIGITS_SPLITS}
    assert {s: len(i) for s, i in splits.items()} == {"train": 719, "test": 359, "public": 719}
    every = np.concatenate(list(splits.values()))
    assert len(set(every.tolist())) == 1797  # disjoint, and together all of digits
    assert np.array_equal(ic.digits_indices("train"), splits["train"])  # not seed-dependent
    with pytest.raises(FedhavenError, match=r"no bundled digits split 'val'"):
        ic.digits_indices("val")


def test_bundled_digits_need_digit_labels(resnet_dir: Path) -> None:
    cfg = _cfg(resnet_dir, "bundled")
    with pytest.raises(FedhavenError, match=r"is not in the configured label set"):
        get_task(cfg).load("bundled")
    digits = cfg.replace(**{"data.labels": ic.DIGITS_LABELS})
    ds = get_task(digits).load("bundled", split="test")
    assert len(ds) == 359 and ds[ic.IMAGE][0].size == (8, 8)


# --- encoding --------------------------------------------------------------------------


def test_encode_shapes_and_channels(resnet_cfg: Config, vit_cfg: Config, image_dir: Path) -> None:
    for cfg in (resnet_cfg, vit_cfg):
        task = get_task(cfg)
        pixels, labels = task.encode(task.load(str(image_dir))).tensors
        assert pixels.shape == (18, 3, SIZE, SIZE) and pixels.dtype == torch.float32
        assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
        # grayscale copied to the three channels; the RGB image of each class too
        assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])
    # the ViT has no image processor: the default maps [0, 255] to [-1, 1]
    task = get_task(vit_cfg)
    black = ic._images_dataset([Image.new("L", (8, 8), 0), Image.new("L", (5, 9), 255)], [0, 1])
    pixels = task.encode(black).tensors[0]
    assert pixels.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(pixels[0], torch.tensor(-1.0)) and torch.allclose(
        pixels[1], torch.tensor(1.0)
    )
    empty = task.encode(black.select([])).tensors
    assert empty[0].shape == (0, 3, SIZE, SIZE) and empty[1].shape == (0,)


def test_directory_processor_is_resized_to_image_size(resnet_cfg: Config) -> None:
    # the tiny ResNet's processor says 8×8: model.image-size wins, its mean and std stay
    task = get_task(resnet_cfg)
    pixels = task.encode(ic._images_dataset([Image.new("RGB", (8, 8), (255, 0, 0))], [0]))
    red = pixels.tensors[0][0]
    assert red.shape == (3, SIZE, SIZE)
    assert torch.allclose(red[0], torch.tensor(2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(red[1:], torch.tensor(-2.0))  # (0 - 0.5) / 0.25


def test_one_channel_model(tmp_path: Path, image_dir: Path) -> None:
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1])
    ResNetForImageClassification(config).save_pretrained(tmp_path)
    task = get_task(_cfg(tmp_path, image_dir))
    pixels = task.encode(task.load(str(image_dir))).tensors[0]
    assert pixels.shape == (18, 1, SIZE, SIZE)


def test_vit_rejects_another_image_size(vit_dir: Path, image_dir: Path) -> None:
    task = get_task(_cfg(vit_dir, image_dir, **{"model.image-size": 32}))
    with pytest.raises(FedhavenError, match=rf"takes {SIZE}×{SIZE} images: set model.image-size"):
        task.build_base()
    with pytest.raises(FedhavenError, match=r"set model.image-size"):
        task.encode(task.load(str(image_dir)))


def test_rows_identify_pixels_and_label(resnet_cfg: Config, image_dir: Path) -> None:
    task = get_task(resnet_cfg)
    ds = task.load(str(image_dir))
    rows = task.rows(ds)
    assert rows == task.rows(task.load(str(image_dir)))  # deterministic
    assert len({h for h, _ in rows}) == 18 and [y for _, y in rows] == ds["label"]
    changed = np.asarray(ds[ic.IMAGE][0]).copy()
    changed[0, 0] ^= 1
    other = ic._images_dataset([Image.fromarray(changed)], [0])
    assert task.rows(other)[0][0] != rows[0][0]


# --- training under DP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_data(resnet_cfg: Config, image_dir: Path) -> TensorDataset:
    task = get_task(resnet_cfg)
    return task.encode(task.load(str(image_dir)))


def _norms(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_batch_norm_uses_running_statistics_in_train_mode(
    resnet_cfg: Config, resnet_data: TensorDataset
) -> None:
    model = build_model(resnet_cfg)
    model.train()
    x = resnet_data.tensors[0]
    alone = model(pixel_values=x[:1]).logits
    in_batch = model(pixel_values=x).logits[:1]
    # a sample's output does not depend on the others in its batch (what DP-SGD assumes)
    assert torch.allclose(alone, in_batch, atol=1e-5)


def test_dp_round_keeps_batch_norm_frozen_and_moves_lora(
    resnet_cfg: Config, resnet_data: TensorDataset
) -> None:
    cfg = resnet_cfg.replace(**{"privacy.enabled": True, "train.local-steps": 2})
    model = build_model(cfg)
    norms = _norms(model)
    assert norms
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    modes: list[bool] = []
    for m in norms:
        m.register_forward_hook(lambda mod, *_: modes.append(mod.training))
    before = adapter_state(model)
    result = train_round(model, resnet_data, cfg)
    assert result.epsilon is not None and result.epsilon > 0
    assert modes and not any(modes)  # every BatchNorm forward ran in eval mode
    for m, (mean, var) in zip(norms, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    after = adapter_state(model)
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and all(not torch.equal(before[k], after[k]) for k in lora_b)
    assert all(not torch.equal(before[k], after[k]) for k in before if "classifier" in k)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_dp_with_noise_and_clipping_off_equals_plain_training(
    arch: str,
    resnet_cfg: Config,
    vit_cfg: Config,
    image_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Opacus's per-sample gradients of the LoRA convolutions / projections sum to the
    # plain gradient: nothing (BatchNorm, a hook) mixes samples or hides a gradient.
    monkeypatch.setattr(
        training,
        "_optimizer",
        lambda model, cfg, *_: torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.train.learning_rate
        ),
    )
    base = resnet_cfg if arch == "resnet" else vit_cfg
    task = get_task(base)
    data = task.encode(task.load(str(image_dir)))
    flat = {
        "train.batch-size": len(data),
        "train.local-steps": 1,
        "train.learning-rate": 1.0,
        "privacy.max-grad-norm": 1e6,
    }
    cfg_dp = base.replace(**flat, **{"privacy.enabled": True})
    cfg_plain = base.replace(**flat, **{"privacy.enabled": False})
    model_dp = build_model(cfg_dp)
    model_plain = copy.deepcopy(model_dp)
    start = adapter_state(model_dp)
    prior = [0.2, 0.3, 0.5]
    train_round(
        model_dp, data, cfg_dp, noise_multiplier=0.0, poisson_sampling=False, label_prior=prior
    )
    train_round(model_plain, data, cfg_plain, label_prior=prior)
    a, b = adapter_state(model_dp), adapter_state(model_plain)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3


def test_predict_returns_one_label_per_image(vit_cfg: Config, tmp_path: Path) -> None:
    for i in range(5):
        _image(i % 3, i).save(tmp_path / f"img{i}.png")
    task = get_task(vit_cfg)
    rows = task.predict(build_model(vit_cfg), task.load(str(tmp_path), labeled=False))
    assert [r["file"] for r in rows] == [f"img{i}.png" for i in range(5)]
    for r in rows:
        assert r["label"] in LABELS
        assert sum(r[f"p_{n}"] for n in LABELS) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(LABELS, key=lambda n: r[f"p_{n}"])


# --- the digits export and the bundled model -------------------------------------------


def test_export_digits_matches_the_bundled_split(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    assert ic.export_digits(out, "test") == 359
    labels = ic.DIGITS_LABELS
    task = get_task(from_flat({"model.task": "image-cls", "data.labels": labels}))
    exported, bundled = task.load(str(out)), task.load("bundled", split="test")
    assert sorted(task.rows(exported)) == sorted(task.rows(bundled))  # the same pixels
    with pytest.raises(FedhavenError, match=r"exists and is not empty"):
        ic.export_digits(out)
    assert len(list(out.rglob("*.png"))) == 359  # untouched


def test_cli_data_digits(tmp_path: Path) -> None:
    from fedhaven.cli import app

    result = CliRunner().invoke(app, ["data", "digits", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "1797 digit images" in result.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [str(d) for d in range(10)]
    with Image.open(tmp_path / "d" / "0" / "0.png") as im:  # row 0 of load_digits is a 0
        assert im.size == (8, 8) and im.mode == "L"


def test_prepare_digits_resnet_once_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(dr._PRETRAIN, "train.local-epochs", 1)  # the recipe, shortened
    path = dr.prepare_digits_resnet(tmp_path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left
    info = json.loads((path / dr.PRETRAINING_FILE).read_text())
    assert info["steps"] == 6  # the 357 public images of digits 0-4, batches of 64
    assert "'public'" in info["data"]
    calls: list[object] = []
    monkeypatch.setattr(training, "train_round", lambda *a, **k: calls.append(a))
    assert dr.prepare_digits_resnet(tmp_path) == path and not calls  # cached
    # a backbone: any label set gets a fresh head; the processor converts digits to 3×32×32
    cfg = from_flat(
        {"model.task": "image-cls", "model.path": str(path), "data.labels": ic.DIGITS_LABELS}
    )
    task = get_task(cfg)
    base = task.build_base()
    assert base.classifier[1].out_features == 10
    pixels = task.encode(task.load("bundled", split="test")).tensors[0]
    assert pixels.shape == (359, 3, 32, 32)
