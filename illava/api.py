"""One call to turn iLLaVA on, one to turn it off."""

from __future__ import annotations

import torch

from .adapters import adapter_for, unswap_class
from .config import IllavaConfig, preset
from .llm import LLMStage
from .state import IllavaState, Stats


def resolve_config(model: torch.nn.Module, config: IllavaConfig | str | None = "image", **overrides) -> IllavaConfig:
    """The configuration ``apply`` would use: a preset name scaled to ``model``, or a config."""
    adapter = adapter_for(model)
    dims = adapter.dimensions(model)
    if config is None:
        config = "image"
    if isinstance(config, str):
        cfg = preset(
            config,
            encoder_depth=dims["encoder_depth"],
            tokens_per_crop=dims["tokens_per_crop"],
            llm_depth=dims["llm_depth"],
            family=adapter.family(model),
            llm_stage=adapter.llm_stage_in_presets(model),
        )
        cfg = adapter.adjust_preset(model, cfg)
        cfg = cfg.replace(**overrides) if overrides else cfg
    elif isinstance(config, IllavaConfig):
        cfg = config.replace(**overrides) if overrides else config
    else:
        raise TypeError(f"config must be an IllavaConfig or a preset name, got {type(config).__name__}")
    cfg.check_against(**dims)
    adapter.check(model, cfg)
    return cfg


def apply(model: torch.nn.Module, config: IllavaConfig | str | None = "image", **overrides) -> IllavaConfig:
    """Turn iLLaVA on for a loaded model, in place; returns the configuration in use.

    ``config`` is a preset name (``image``, ``video``, ``encoder-only``, ``llm-only``, ``off``)
    scaled to the model's depths, or an ``IllavaConfig``; keyword ``overrides`` replace fields.
    Applying again replaces the previous configuration. ``remove`` restores stock behaviour.
    """
    cfg = resolve_config(model, config, **overrides)
    if is_applied(model):
        remove(model)
    adapter = adapter_for(model)
    state = IllavaState(cfg, renumber_positions=adapter.renumber_positions)
    inner, _, decoder = adapter.parts(model)
    adapter.patch(model, state)
    stage = LLMStage(state, decoder, adapter.query_key())
    stage.attach()
    handles = [inner.register_forward_pre_hook(_new_forward_hook(state), with_kwargs=True)]
    handles += adapter.hooks(model, state)
    model._illava_state = state
    model._illava_handles = (stage, handles)
    return cfg


def remove(model: torch.nn.Module) -> None:
    """Restore stock behaviour exactly: every swapped class and hook is undone."""
    if not is_applied(model):
        return
    stage, handles = model._illava_handles
    stage.detach()
    for h in handles:
        h.remove()
    for module in model.modules():
        unswap_class(module)
    del model._illava_state, model._illava_handles


def is_applied(model: torch.nn.Module) -> bool:
    return hasattr(model, "_illava_state")


def config_of(model: torch.nn.Module) -> IllavaConfig:
    _require(model)
    return model._illava_state.config


def set_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Keep the patches but switch the method on or off (off behaves exactly like stock)."""
    _require(model)
    state = model._illava_state
    state.config = state.config.replace(enabled=enabled)


def stats(model: torch.nn.Module) -> Stats:
    """Visual tokens per stage of the last prefill (encoder in/out per crop, LLM in/out per layer)."""
    _require(model)
    return model._illava_state.stats


def _require(model) -> None:
    if not is_applied(model):
        raise ValueError("illava is not applied to this model; call illava.apply(model) first")


def _new_forward_hook(state: IllavaState):
    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        state.new_forward(prefill)

    return hook
