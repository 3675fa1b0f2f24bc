"""Task artifacts: save, load and check what a task adds to a frozen backbone."""

from vprompt.tasks.artifact import (
    TASK_JSON,
    TASK_TENSORS,
    TaskInfo,
    check_backbone,
    load_task,
    read_task_info,
    save_task,
    task_size_bytes,
)

__all__ = [
    "TASK_JSON",
    "TASK_TENSORS",
    "TaskInfo",
    "check_backbone",
    "load_task",
    "read_task_info",
    "save_task",
    "task_size_bytes",
]
