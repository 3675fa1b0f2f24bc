"""vprompt: visual prompt tuning for frozen pretrained vision backbones."""

from vprompt._version import __version__

__all__ = ["__version__"]
