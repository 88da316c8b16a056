"""image-cls: image classification with a ResNet- or ViT-style model (the demo: digits).

Data is a folder with one subfolder per label (``DIR/<label>/*.png``), or a table (csv /
jsonl / parquet) with a column of image paths (relative to the table's folder) and a label
column; "bundled" is scikit-learn's 8×8 digits, in memory. Images are converted to the model's
channels (grayscale -> RGB for a 3-channel model) and resized to ``model.image-size``.

No pretrained vision checkpoint can be had offline (torchvision and timm weights download),
so the bundled model, ``digits-resnet``, is a small ResNet pre-trained here once, centrally,
on the digits 0-4 of a public part of digits that no site federates on
(:mod:`fedhaven.tasks.digits_resnet`). It stands in for a pretrained checkpoint; point
``model.path`` at a real one for real work.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import TensorDataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PretrainedConfig,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from fedhaven.config import AUTO, BUNDLED
from fedhaven.data import LABEL, read_table, require_columns
from fedhaven.errors import FedhavenError
from fedhaven.tasks.base import ClassificationTask

log = logging.getLogger(__name__)

IMAGE = "image"  # the decoded images after load
FILE = "file"  # where each image came from (relative path), for images read from files
#: LoRA targets per config.json model_type: every layer PEFT can adapt that carries the
#: model's features (HF ResNet names each Conv2d "convolution"; ViT's attention projections).
TARGETS = {"resnet": "convolution", "vit": "q_proj,v_proj"}
#: The head of AutoModelForImageClassification (ResNet, ViT): fresh, trained and sent.
HEAD = "classifier"

#: What the bundled digits are split into, by a fixed permutation (not train.seed: the split
#: decides which rows the bundled model saw). test: 20% of the 1,797 images; the rest is
#: halved: "public" (pre-training of digits-resnet only) and "train" (what sites federate on).
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLITS = ("train", "test", "public")
DIGITS_LABELS = ",".join(str(d) for d in range(10))
_DIGITS_SEED = 0


# --- the bundled digits -----------------------------------------------------------------


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 8×8 images (0..16 scaled to 0..255) and int labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def digits_indices(split: str) -> np.ndarray:
    """Row indices (into ``load_digits()``) of a bundled split: train, test or public."""
    if split not in DIGITS_SPLITS:
        raise FedhavenError(f"no bundled digits split {split!r}: use one of {DIGITS_SPLITS}")
    n = len(_digits()[1])
    order = np.random.default_rng(_DIGITS_SEED).permutation(n)
    n_test = round(n * DIGITS_TEST_FRACTION)
    rest = order[n_test:]
    parts = {
        "test": order[:n_test],
        "public": rest[: len(rest) // 2],
        "train": rest[len(rest) // 2 :],
    }
    return np.sort(parts[split])


def export_digits(directory: str | Path, split: str = "all") -> int:
    """Write digits as ``DIRECTORY/<label>/<index>.png`` (8×8 grayscale; index: the row of
    ``load_digits()``); ``split``: all, or one of :data:`DIGITS_SPLITS`. Refuses a
    non-empty directory. Returns the number of images written."""
    d = Path(directory).expanduser()
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise FedhavenError(f"'{d}' exists and is not empty: pass a new or empty directory")
    images, labels = _digits()
    indices = np.arange(len(labels)) if split == "all" else digits_indices(split)
    for i in indices:
        (d / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(d / str(labels[i]) / f"{i}.png")
    return len(indices)


# --- reading images ---------------------------------------------------------------------


def _read_image(path: Path, source: str) -> dict[str, Any]:
    """The file's bytes, once decoded to check they are an image (for the Image feature)."""
    if not path.is_file():
        raise FedhavenError(f"{source}: image file '{path}' not found: fix the path or remove it")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not in training
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise FedhavenError(
            f"{source}: image file '{path}' could not be read ({type(e).__name__}): "
            "replace it with a valid image or remove it"
        ) from e
    return {"bytes": path.read_bytes(), "path": None}


def _label_ids(labels: list[str], raw: list[Any], source: str) -> list[int]:
    ids = {name: i for i, name in enumerate(labels)}
    values = [str(v).strip() for v in raw]
    unknown = sorted(set(values) - ids.keys())
    if unknown:
        raise FedhavenError(
            f"{source}: label {unknown[0]!r} is not in the configured label set {labels}: "
            "add it to data.labels or fix the data"
        )
    return [ids[v] for v in values]


def _images_dataset(
    images: list[Any], labels: list[int] | None, extra: dict[str, list[Any]] | None = None
) -> Dataset:
    columns: dict[str, list[Any]] = {**(extra or {}), IMAGE: images}
    if labels is not None:
        columns[LABEL] = labels
    ds = Dataset.from_dict(columns)  # extra columns keep their inferred types
    features = dict(ds.features) | {IMAGE: ImageFeature()}
    if labels is not None:
        features[LABEL] = Value("int64")
    return ds.cast(Features(features))


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


# --- the task ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _model_config(path: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(path)


@functools.lru_cache(maxsize=4)
def load_processor(path: Path, size: int, channels: int) -> Any:
    """The directory's image processor, set to output ``size`` × ``size`` (without one:
    :func:`default_processor`). The PIL backend: the same pixels at every site, whatever else
    is installed there."""
    if not (path / "preprocessor_config.json").is_file():
        return default_processor(size, channels)
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    # keep the processor's own kind of size: ConvNeXt-style (shortest edge, then crop) or exact
    if getattr(processor.size, "shortest_edge", None) and not processor.size.height:
        processor.size = {"shortest_edge": size}
    else:
        processor.size = {"height": size, "width": size}
    if getattr(processor, "do_center_crop", False):
        processor.crop_size = {"height": size, "width": size}
    return processor


def default_processor(size: int, channels: int) -> ViTImageProcessorPil:
    """For a model directory without an image processor: resize to ``size`` × ``size``
    (bilinear), scale to [0, 1], normalise each channel with mean 0.5 and std 0.5 (to [-1, 1])."""
    return ViTImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=[0.5] * channels,
        image_std=[0.5] * channels,
    )


def encode_images(ds: Dataset, processor: Any, channels: int, size: int) -> TensorDataset:
    """``ds``'s images in ``channels`` channels through ``processor`` (which must give
    ``size`` × ``size``), and its labels (zeros without)."""
    labels = ds[LABEL] if LABEL in ds.column_names else [0] * len(ds)
    target = torch.tensor(labels, dtype=torch.long)
    if len(ds) == 0:
        return TensorDataset(torch.zeros(0, channels, size, size), target)
    mode = "RGB" if channels == 3 else "L"
    images = [im.convert(mode) for im in ds[IMAGE]]
    pixels = processor(images, return_tensors="pt")["pixel_values"].float()
    if tuple(pixels.shape[1:]) != (channels, size, size):
        raise FedhavenError(
            f"the image processor gives images of shape {tuple(pixels.shape[1:])}, not "
            f"{(channels, size, size)}: fix the model's preprocessor_config.json or remove it "
            "(fedhaven then uses its default)"
        )
    return TensorDataset(pixels, target)


def _use_running_stats(module: nn.Module, _: tuple[Any, ...]) -> None:
    module.eval()


def freeze_batch_norm_statistics(model: nn.Module) -> int:
    """Make every BatchNorm normalise with its running statistics, even in train mode.

    In train mode BatchNorm normalises each sample with its batch's statistics: a sample's
    output (and so its gradient) depends on the other samples, which breaks DP-SGD's
    per-sample clipping and so the privacy guarantee (Opacus rejects trainable BatchNorm for
    this reason; a frozen one passes its check but mixes samples all the same). The base is
    frozen, so its running statistics are what it was pretrained with. A forward pre-hook
    rather than ``eval()`` once: the training loop calls ``model.train()`` every round.
    Returns the number of BatchNorm layers.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
        m.register_forward_pre_hook(_use_running_stats)
    return len(norms)


class ImageCls(ClassificationTask):
    name = "image-cls"
    inputs = ("pixel_values",)
    hf_auto_class = "AutoModelForImageClassification"

    @property
    def lora_defaults(self) -> tuple[str, str, str]:  # type: ignore[override]
        """Targets by the model's type (resnet: every Conv2d; vit: q_proj, v_proj), the head,
        every layer."""
        targets = self.cfg.lora.target_modules
        if targets == AUTO:
            model_type = self._config().model_type
            if model_type not in TARGETS:
                raise FedhavenError(
                    f"no LoRA defaults for model type '{model_type}' (known: "
                    f"{', '.join(TARGETS)}): set lora.target-modules to its attention, linear "
                    "or convolution layer names, e.g. 'q_proj,v_proj'"
                )
            targets = TARGETS[model_type]
        return targets, HEAD, ""

    def _config(self) -> PretrainedConfig:
        return _model_config(self.model_path())

    def _channels(self) -> int:
        channels = getattr(self._config(), "num_channels", 3)
        if channels not in (1, 3):
            raise FedhavenError(
                f"model '{self.model_path()}' takes {channels}-channel images: "
                "image-cls supports 1 (grayscale) or 3 (RGB) channels"
            )
        return channels

    def _check_image_size(self) -> None:
        # ViT-style models embed a fixed grid of patches: another size fails mid-forward.
        fixed = getattr(self._config(), "image_size", None)
        size = self.cfg.model.image_size
        if isinstance(fixed, int) and fixed != size:
            raise FedhavenError(
                f"config 'model.image-size' = {size} but model '{self.model_path()}' takes "
                f"{fixed}×{fixed} images: set model.image-size to {fixed}"
            )

    def bundled_model(self) -> Path:
        """digits-resnet, prepared once and cached (:func:`prepare_digits_resnet`)."""
        # imported here: its pre-training reads images with this module's functions
        from fedhaven.tasks.digits_resnet import prepare_digits_resnet

        return prepare_digits_resnet()

    def build_base(self) -> nn.Module:
        labels, path = self.labels, self.model_path()
        self._check_image_size()
        model = AutoModelForImageClassification.from_pretrained(
            path,
            id2label=dict(enumerate(labels)),  # and so num_labels
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,  # the checkpoint's head may have another label count
        )
        freeze_batch_norm_statistics(model)
        return model

    def processor(self) -> Any:
        return load_processor(self.model_path(), self.cfg.model.image_size, self._channels())

    def load(self, path: str, *, split: str = "train", labeled: bool = True) -> Dataset:
        """A folder with one subfolder per label, a table of image paths and labels, or the
        bundled digits (``split``: train, test or public; see :data:`DIGITS_SPLITS`)."""
        if path == BUNDLED:
            return self._load_digits(split)
        p = Path(path).expanduser()
        if p.is_dir():
            return self._load_folder(p, labeled)
        return self._load_table(p, path, labeled)

    def _load_digits(self, split: str) -> Dataset:
        images, labels = _digits()
        idx = digits_indices(split)
        ids = _label_ids(self.labels, labels[idx].tolist(), "the bundled digits")
        return _images_dataset([Image.fromarray(images[i], mode="L") for i in idx], ids)

    def _load_folder(self, root: Path, labeled: bool) -> Dataset:
        source = f"image folder '{root}'"
        entries = sorted(c for c in root.iterdir() if not _is_hidden(c))
        folders = [c for c in entries if c.is_dir()]
        loose = [c for c in entries if c.is_file()]
        if not folders and loose and not labeled:  # a flat folder of images to predict
            images = [_read_image(f, source) for f in loose]
            return _images_dataset(images, None, {FILE: [f.name for f in loose]})
        if loose:
            raise FedhavenError(
                f"{source}: '{loose[0].name}' is not in a label subfolder: put each image in "
                "the subfolder named after its label (DIR/<label>/<image>)"
            )
        unknown = [f.name for f in folders if f.name not in self.labels]
        if unknown:
            raise FedhavenError(
                f"{source}: subfolder '{unknown[0]}' is not a label in {self.labels}: "
                "name each subfolder after a label in data.labels, or add it there"
            )
        images, labels, names = [], [], []
        for folder in sorted(folders, key=lambda f: self.labels.index(f.name)):
            files = sorted(f for f in folder.rglob("*") if f.is_file() and not _is_hidden(f))
            if not files:
                log.warning("%s: subfolder '%s' has no images", source, folder.name)
            images += [_read_image(f, source) for f in files]
            labels += [self.labels.index(folder.name)] * len(files)
            names += [f.relative_to(root).as_posix() for f in files]
        if not images:
            raise FedhavenError(
                f"{source} has no images: give it one subfolder per label "
                "(DIR/<label>/<image>), e.g. `fedhaven data digits DIR`"
            )
        return _images_dataset(images, labels, {FILE: names})

    def _load_table(self, p: Path, path: str, labeled: bool) -> Dataset:
        ds = read_table(path)  # errors for a missing, empty or unreadable file
        source = f"data file '{path}'"
        data = self.cfg.data
        needed = [(data.image_column, "image-column")]
        if labeled or data.label_column in ds.column_names:
            needed.append((data.label_column, "label-column"))
        require_columns(ds, needed, source, hint="")
        base = p.expanduser().resolve().parent
        images = []
        for v in ds[data.image_column]:
            if not isinstance(v, str) or not v.strip():
                raise FedhavenError(
                    f"{source}: column '{data.image_column}' has an empty or non-text value "
                    f"({v!r}): give every row an image path"
                )
            images.append(_read_image(base / Path(v.strip()).expanduser(), source))
        labels = None
        if len(needed) == 2:
            labels = _label_ids(self.labels, ds[data.label_column], source)
        extra = {c: ds[c] for c in ds.column_names if c not in (data.image_column, IMAGE, LABEL)}
        extra[FILE] = [v.strip() for v in ds[data.image_column]]
        return _images_dataset(images, labels, extra)

    def encode(self, ds: Dataset) -> TensorDataset:
        """``(pixel_values, label)``: float (N, channels, size, size) and long (N,)."""
        self._check_image_size()
        return encode_images(ds, self.processor(), self._channels(), self.cfg.model.image_size)

    def predict(self, model: nn.Module, ds: Dataset) -> list[dict[str, Any]]:
        """The label and each label's probability per image, after its file when it has one."""
        out = super().predict(model, ds)
        if FILE not in ds.column_names:
            return out
        return [{FILE: f, **row} for f, row in zip(ds[FILE], out, strict=True)]

    def rows(self, ds: Dataset) -> list[Any]:
        """SHA-256 of each image's mode, size and pixels, with its label."""
        out = []
        for im, y in zip(ds[IMAGE], ds[LABEL], strict=True):
            h = hashlib.sha256(f"{im.mode}:{im.size}:".encode())
            h.update(im.tobytes())
            out.append([h.hexdigest(), y])
        return out
