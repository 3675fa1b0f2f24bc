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
from vprompt.engine.demo import DemoResult, format_demo, run_demo
from vprompt.engine.evaluate import Predictions, predict_split, save_confusion_png, summarize
from vprompt.engine.inference import (
    evaluate_task,
    expand_inputs,
    load_task_model,
    predict_images,
)
from vprompt.engine.run import RunResult, load_backbone_reproducibly, resume_run, train_run
from vprompt.engine.trainer import EpochHook, FitResult, TrainingInterrupted, fit

__all__ = [
    "METHOD_DEFAULTS",
    "DemoResult",
    "EpochHook",
    "FitResult",
    "MethodDefaults",
    "Predictions",
    "RunResult",
    "TrainConfig",
    "TrainingInterrupted",
    "evaluate_task",
    "expand_inputs",
    "fit",
    "format_demo",
    "load_backbone_reproducibly",
    "load_config_file",
    "load_task_model",
    "merge_options",
    "method_defaults",
    "parse_set_options",
    "predict_images",
    "predict_split",
    "resolve_config",
    "resume_run",
    "run_demo",
    "save_confusion_png",
    "summarize",
    "train_run",
]
