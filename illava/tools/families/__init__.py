"""The tooling of every family (``illava.tools.families.base.FamilyTools`` documents the interface)
and its registry: ``tools_for(model_or_config)``. The runtime side of a family is its adapter
(``illava.adapters``); one file per family here, one line in the registry."""

from __future__ import annotations

from .base import FamilyTools
from .gemma3 import Gemma3Tools
from .internvl import InternVLTools
from .llava import LlavaTools
from .llava_next import LlavaNextTools
from .llava_onevision import LlavaOnevisionTools
from .qwen3_vl import Qwen3VLTools
from .qwen_vl import QwenVLTools

# one line per family
FAMILIES: tuple[FamilyTools, ...] = (
    LlavaOnevisionTools(),
    QwenVLTools(),
    Qwen3VLTools(),
    InternVLTools(),
    LlavaTools(),
    LlavaNextTools(),
    Gemma3Tools(),
)


def tools_for(model_or_config) -> FamilyTools:
    """The tooling of a model or a model configuration (by ``config.model_type``); ``TypeError`` if
    no family serves it."""
    config = model_or_config if hasattr(model_or_config, "model_type") else model_or_config.config
    for tools in FAMILIES:
        if config.model_type in tools.config_types:
            return tools
    supported = sorted(t for f in FAMILIES for t in f.config_types)
    raise TypeError(f"illava does not support model type {config.model_type!r}; supported: {', '.join(supported)}")
