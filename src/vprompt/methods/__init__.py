"""Tuning methods: one module per method, registered by name.

Importing this package registers every built-in method.
"""

from vprompt.methods.base import ClassifierHead, Method, MethodConfig, PoolType, PromptedModel
from vprompt.methods.registry import attach, get_method_class, list_methods, make_config, register_method
from vprompt.methods.vpt import VPTConfig, VPTDeepConfig, VPTShallowConfig

__all__ = [
    "ClassifierHead",
    "Method",
    "MethodConfig",
    "PoolType",
    "PromptedModel",
    "VPTConfig",
    "VPTDeepConfig",
    "VPTShallowConfig",
    "attach",
    "get_method_class",
    "list_methods",
    "make_config",
    "register_method",
]
