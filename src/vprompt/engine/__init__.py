"""Training and evaluation: the loop, optimiser + schedule, checkpoint + resume, logging, DDP.

>>> from vprompt.engine import train_run
>>> train_run({"backbone": "zoo:dinov2-s", "data": "builtin:digits", "method": "vpt-deep",
...            "img_size": 112, "epochs": 10}, "runs/digits-vpt")
"""

from vprompt.engine.config import (
    METHOD_DEFAULTS,
    MethodDefaults,
    TrainConfig,
    load_config_file,
    merge_options,
    method_defaults,
    parse_set_options,
    resolve_config,
)
from vprompt.engine.evaluate import Predictions, predict_split, save_confusion_png, summarize
from vprompt.engine.run import RunResult, load_backbone_reproducibly, resume_run, train_run
from vprompt.engine.trainer import FitResult, TrainingInterrupted, fit

__all__ = [
    "METHOD_DEFAULTS",
    "FitResult",
    "MethodDefaults",
    "Predictions",
    "RunResult",
    "TrainConfig",
    "TrainingInterrupted",
    "fit",
    "load_backbone_reproducibly",
    "load_config_file",
    "merge_options",
    "method_defaults",
    "parse_set_options",
    "predict_split",
    "resolve_config",
    "resume_run",
    "save_confusion_png",
    "summarize",
    "train_run",
]
