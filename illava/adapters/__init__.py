"""The family adapters (``illava.adapters.base`` documents the interface), their registry, and the
methods' view of a transformers model (``AdapterTarget``, registered with ``illava.methods``)."""

from __future__ import annotations

from ..config import IllavaConfig
from ..families import record_for
from ..methods import Target, register_target
from .base import Adapter
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen_vl import QwenVLAdapter

# one line per family
ADAPTERS: tuple[Adapter, ...] = (
    LlavaOnevisionAdapter(),
    QwenVLAdapter(),
    Qwen3VLAdapter(),
    InternVLAdapter(),
    LlavaAdapter(),
    LlavaNextAdapter(),
    Gemma3Adapter(),
)


def adapter_for(model) -> Adapter:
    """The adapter serving ``model``'s class (or a parent class), fitted to the model
    (``Adapter.for_model``); ``TypeError`` if none does."""
    names = [c.__name__ for c in type(model).__mro__]
    for adapter in ADAPTERS:
        if any(name in adapter.model_classes for name in names):
            return adapter.for_model(model)
    supported = sorted(n for a in ADAPTERS for n in a.model_classes)
    raise TypeError(f"illava does not support {type(model).__name__}; supported model classes: {', '.join(supported)}")


def adapter_for_type(model_type: str) -> Adapter:
    """The adapter of a model type (``config.model_type``): the one of its family's record;
    ``TypeError`` naming the supported types if no family has it (``illava.families.record_for``)."""
    record = record_for(model_type)
    return next(adapter for adapter in ADAPTERS if adapter.record is record)


class AdapterTarget(Target):
    """What the methods' builders (``illava.methods``) read of a transformers model, from its adapter."""

    def __init__(self, model):
        self._model, self._adapter = model, adapter_for(model)
        self.unit = self._adapter.unit
        self.mergeable = tuple(self._adapter.mergeable_layers(model))
        self.dimensions = self._adapter.dimensions(model)
        self.llm_depth = self.dimensions.llm_depth
        self.model_type = model.config.model_type

    def preset(self, name: str) -> IllavaConfig:
        return self._adapter.preset(self._model, name)

    def measured_layers(self, count: int) -> tuple[int, ...]:
        from ..plan.schedule import measured_layers

        return measured_layers(self._model, count)


register_target(AdapterTarget)  # Method.config(model, knob) takes a transformers model
