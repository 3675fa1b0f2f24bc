"""vprompt: visual prompt tuning for frozen pretrained vision backbones.

The data path, in one screen::

    import vprompt

    backbone = vprompt.load_backbone("zoo:dinov2-s", img_size=112)      # frozen timm model
    splits = vprompt.build_splits("builtin:fashion-mnist", data_config=backbone.data_config,
                                  train_size=800, val_size=200, test_size=1000)
    model = vprompt.attach(backbone, "vpt-deep", num_classes=splits.num_classes, prompt_len=10)
    ...                                                                    # train (vprompt.engine)
    model.save_task("runs/fmnist/task")                                    # ~200 KB
    task = vprompt.load_task("runs/fmnist/task", backbone=backbone)
"""

import importlib
from typing import TYPE_CHECKING, Any

from vprompt._version import __version__
from vprompt.errors import (
    BackboneError,
    ConfigError,
    DataError,
    TaskError,
    TrainingDiverged,
    TrainingError,
    VPromptError,
)

# The public names, imported on first use: `import vprompt` (and so the `vprompt` command's
# start-up, `vprompt --help`) does not pay for torch, timm and torchvision until they are needed.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("Backbone", "DataConfig", "list_zoo", "load_backbone"), "vprompt.backbones"),
    **dict.fromkeys(("DataSplits", "build_splits", "build_transform"), "vprompt.data"),
    **dict.fromkeys(("TrainConfig", "fit", "resume_run", "train_run"), "vprompt.engine"),
    **dict.fromkeys(
        (
            "Method",
            "MethodConfig",
            "PromptedModel",
            "attach",
            "get_method_class",
            "list_methods",
            "make_config",
            "register_method",
        ),
        "vprompt.methods",
    ),
    **dict.fromkeys(("TaskInfo", "load_task", "read_task_info", "save_task"), "vprompt.tasks"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools see
    from vprompt.backbones import Backbone, DataConfig, list_zoo, load_backbone
    from vprompt.data import DataSplits, build_splits, build_transform
    from vprompt.engine import TrainConfig, fit, resume_run, train_run
    from vprompt.methods import (
        Method,
        MethodConfig,
        PromptedModel,
        attach,
        get_method_class,
        list_methods,
        make_config,
        register_method,
    )
    from vprompt.tasks import TaskInfo, load_task, read_task_info, save_task

__all__ = [
    "Backbone",
    "BackboneError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DataSplits",
    "Method",
    "MethodConfig",
    "PromptedModel",
    "TaskError",
    "TaskInfo",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingError",
    "VPromptError",
    "__version__",
    "attach",
    "build_splits",
    "build_transform",
    "fit",
    "get_method_class",
    "list_methods",
    "list_zoo",
    "load_backbone",
    "load_task",
    "make_config",
    "read_task_info",
    "register_method",
    "resume_run",
    "save_task",
    "train_run",
]
