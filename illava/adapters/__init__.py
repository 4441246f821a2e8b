"""Per-family adapters: the model knowledge, kept thin. The algorithm lives in ``illava.merge``."""

from __future__ import annotations

import types

import torch


def swap_class(module: torch.nn.Module, mixin: type, state) -> None:
    """Give ``module`` a subclass of its own class with ``mixin`` first in the MRO (ToMe-style).

    accelerate's dispatch hooks keep the original bound ``forward`` in ``_old_forward``; it is
    rebound so that the patched forward runs on dispatched models too.
    """
    original = module.__class__
    patched = type(f"{mixin.__name__}_{original.__name__}", (mixin, original), {"_illava_original": original})
    module.__class__ = patched
    module._illava = state
    if hasattr(module, "_old_forward"):
        module._old_forward = types.MethodType(patched.forward, module)


def unswap_class(module: torch.nn.Module) -> None:
    original = getattr(type(module), "_illava_original", None)
    if original is None:
        return
    module.__class__ = original
    for name in ("_illava", "_illava_layer"):
        module.__dict__.pop(name, None)
    if hasattr(module, "_old_forward"):
        module._old_forward = types.MethodType(original.forward, module)


class Adapter:
    """What a model family must tell the library."""

    model_classes: tuple[str, ...] = ()
    renumber_positions = True  # see IllavaState.renumber_positions

    def family(self, model) -> str:
        """Key of the family's presets in ``illava.config.FAMILY_PRESETS``."""
        raise NotImplementedError

    def parts(self, model) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """(inner multimodal model, vision tower, decoder)."""
        raise NotImplementedError

    def dimensions(self, model) -> dict:
        """encoder_depth, tokens_per_crop, llm_depth and feature_layer of this model."""
        raise NotImplementedError

    def llm_stage_in_presets(self, model) -> bool:
        return True

    def adjust_preset(self, model, config):
        """A preset scaled to ``model``, adjusted to what this family can run."""
        return config

    def check(self, model, config) -> None:
        """Raise ``ValueError`` for a configuration this family cannot run."""

    def patch(self, model, state) -> None:
        """Swap the classes this family needs."""
        raise NotImplementedError

    def hooks(self, model, state) -> list:
        """Register this family's hooks; return their handles."""
        return []

    def query_key(self):
        """Function giving the scoring query/keys of a decoder attention module (``illava.llm``)."""
        from ..llm import rope_query_key

        return rope_query_key


def adapter_for(model) -> Adapter:
    from .llava_onevision import LlavaOnevisionAdapter
    from .qwen_vl import QwenVLAdapter

    adapters = [LlavaOnevisionAdapter(), QwenVLAdapter()]
    names = [c.__name__ for c in type(model).__mro__]
    for adapter in adapters:
        if any(name in adapter.model_classes for name in names):
            return adapter
    supported = sorted(n for a in adapters for n in a.model_classes)
    raise TypeError(f"illava does not support {type(model).__name__}; supported model classes: {', '.join(supported)}")
