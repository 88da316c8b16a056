"""One module per task (``model.task``): see :class:`fedhaven.tasks.base.Task`."""

from __future__ import annotations

import importlib

from fedhaven.config import Config
from fedhaven.tasks.base import ClassificationTask, Task

__all__ = ["ClassificationTask", "Task", "get_task"]

#: model.task -> "module:class"; imported on use, so a task's heavy imports stay out of others.
_TASKS = {
    "seq-cls": "fedhaven.tasks.seq_cls:SeqCls",
    "causal-lm": "fedhaven.tasks.causal_lm:CausalLM",
    "image-cls": "fedhaven.tasks.image_cls:ImageCls",
}


def get_task(cfg: Config) -> Task:
    """The task ``cfg.model.task`` names, for this config."""
    module, cls = _TASKS[cfg.model.task].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
