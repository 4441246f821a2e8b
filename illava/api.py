"""One call to turn iLLaVA on, one to turn it off."""

from __future__ import annotations

import torch

from .adapters import adapter_for
from .config import IllavaConfig, scale_preset
from .hf.llm import LLMStage
from .methods import METHODS
from .patch import PatchRecord
from .state import IllavaState, Stats


def resolve_config(model: torch.nn.Module, config: IllavaConfig | str | None = "image", **overrides) -> IllavaConfig:
    """The configuration ``apply`` would use: a preset name scaled to ``model``, or a config."""
    adapter = adapter_for(model)
    if config is None:
        config = "image"
    if isinstance(config, str) and config in METHODS:
        cfg = METHODS[config].config(model)
    elif isinstance(config, str):
        cfg = adapter.preset(model, config)
    elif isinstance(config, IllavaConfig):
        cfg = config
    else:
        raise TypeError(f"config must be an IllavaConfig or a preset name, got {type(config).__name__}")
    cfg = cfg.replace(**overrides) if overrides else cfg
    cfg.check_against(**adapter.dimensions(model).as_dict())
    adapter.check(model, cfg)
    return cfg


def apply(model: torch.nn.Module, config: IllavaConfig | str | None = "image", **overrides) -> IllavaConfig:
    """Turn iLLaVA on for a loaded model, in place; returns the configuration in use.

    ``config`` is a preset name (``image``, ``video``, ``encoder-only``, ``llm-only``, ``off``)
    scaled to the model's depths, a method name (``illava.methods.METHODS``: ``fastv``, ``pdrop``,
    ``tome``, ``visionzip``, ``divprune``, ``random``, ``pool``, ``illava``) at its published
    default, or an ``IllavaConfig``; keyword ``overrides`` replace fields.
    Applying again replaces the previous configuration (if the new one is invalid, the previous
    one stays). ``remove`` restores stock behaviour.
    """
    cfg = resolve_config(model, config, **overrides)
    previous = config_of(model) if is_applied(model) else None
    remove(model)
    try:
        _patch(model, cfg)
    except Exception:
        remove(model)
        if previous is not None:
            _patch(model, previous)
        raise
    return cfg


def _patch(model: torch.nn.Module, cfg: IllavaConfig) -> None:
    adapter = adapter_for(model)
    state = IllavaState(cfg, adapter)
    record = PatchRecord(state)
    model._illava = record
    parts = adapter.parts(model)
    adapter.patch(model, record)
    LLMStage(state, parts.decoder, adapter).attach(record, parts.inner)


def remove(model: torch.nn.Module) -> None:
    """Restore stock behaviour exactly: every swapped class and hook is undone."""
    record = model.__dict__.pop("_illava", None)
    if record is not None:
        record.undo()


def is_applied(model: torch.nn.Module) -> bool:
    return isinstance(model.__dict__.get("_illava"), PatchRecord)


def config_of(model: torch.nn.Module) -> IllavaConfig:
    return _state(model).config


def set_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Keep the patches but switch the method on or off (off behaves exactly like stock)."""
    state = _state(model)
    state.config = state.config.replace(enabled=enabled)


def stats(model: torch.nn.Module) -> Stats:
    """Visual tokens per stage of the last prefill (encoder in/out per crop, LLM in/out per layer)."""
    return _state(model).last_stats


def preset(
    name: str,
    *,
    encoder_depth: int,
    tokens_per_crop: int,
    llm_depth: int,
    family: str = "llava_onevision",
    llm_stage: bool = True,
    **overrides,
) -> IllavaConfig:
    """The preset ``name`` of a model family (a ``config.model_type``) scaled to the given dimensions."""
    from .adapters import adapter_for_type

    adapter = adapter_for_type(family)
    return scale_preset(
        name,
        adapter.presets[family],
        encoder_depth=encoder_depth,
        tokens_per_crop=tokens_per_crop,
        llm_depth=llm_depth,
        llm_stage=llm_stage,
        unit=adapter.unit,
        **overrides,
    )


def _state(model: torch.nn.Module) -> IllavaState:
    if not is_applied(model):
        raise ValueError("illava is not applied to this model; call illava.apply(model) first")
    return model._illava.state
