"""Tuning methods: one module per method, registered by name.

Importing this package registers every built-in method: ``linear``, ``full``, ``bitfit``,
``partial``, ``vpt-shallow``, ``vpt-deep``, ``vpt-pad``, ``spt-shallow``, ``spt-deep`` and
``pro-tuning``.
"""

from vprompt.methods.base import ClassifierHead, Method, MethodConfig, PoolType, PromptedModel
from vprompt.methods.baselines import BitFitConfig, FullConfig, LinearConfig, PartialConfig
from vprompt.methods.pro_tuning import ProTuningConfig
from vprompt.methods.registry import (
    attach,
    get_method_class,
    list_methods,
    make_config,
    register_method,
)
from vprompt.methods.spt import SPTDeepConfig, SPTShallowConfig
from vprompt.methods.vpt import VPTConfig, VPTDeepConfig, VPTShallowConfig
from vprompt.methods.vpt_pad import VPTPadConfig

__all__ = [
    "BitFitConfig",
    "ClassifierHead",
    "FullConfig",
    "LinearConfig",
    "Method",
    "MethodConfig",
    "PartialConfig",
    "PoolType",
    "ProTuningConfig",
    "PromptedModel",
    "SPTDeepConfig",
    "SPTShallowConfig",
    "VPTConfig",
    "VPTDeepConfig",
    "VPTPadConfig",
    "VPTShallowConfig",
    "attach",
    "get_method_class",
    "list_methods",
    "make_config",
    "register_method",
]
