"""Frozen pretrained backbones from spec strings: ``timm:NAME``, ``file:PATH#ARCH``, ``zoo:NAME``.

>>> bb = load_backbone("timm:vit_tiny_patch16_224?pretrained=false&depth=2", img_size=112)
>>> bb.model.forward_features(x)  # (B, 1 + 7 * 7, 192)
"""

from vprompt.backbones.base import Backbone, DataConfig, fingerprint_state
from vprompt.backbones.loader import load_backbone
from vprompt.backbones.spec import BackboneSpec, parse_backbone_spec
from vprompt.backbones.zoo import ZooEntry, fetch_zoo, get_zoo_entry, list_zoo

__all__ = [
    "Backbone",
    "BackboneSpec",
    "DataConfig",
    "ZooEntry",
    "fetch_zoo",
    "fingerprint_state",
    "get_zoo_entry",
    "list_zoo",
    "load_backbone",
    "parse_backbone_spec",
]
