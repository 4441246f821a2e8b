"""One call to turn iLLaVA on, one to turn it off."""

from __future__ import annotations

import warnings

import torch

from . import tuned
from .adapters import adapter_for
from .config import PRESETS, IllavaConfig
from .hf.llm import LLMStage
from .methods import METHODS, REGISTRY
from .patch import PatchRecord
from .state import IllavaState, Stats


def configure(
    model: torch.nn.Module, config: IllavaConfig | str | None = "image", knob: float | None = None, **overrides
) -> IllavaConfig:
    """The configuration ``apply`` would use for ``model``, checked against it.

    ``config`` is one of:

    - a preset name (``PRESETS``: ``image``, ``video``, ``encoder-only``, ``llm-only``, ``off``),
      the family's published settings scaled to the model's depths;
    - a method name (``METHODS``: ``illava``, ``fastv``, ``pdrop``, ``tome``, ``visionzip``,
      ``divprune``, ``random``, ``pool``, ...; docs/peers.md) at its published default, or at
      ``knob`` (its one budget knob, e.g. the share of visual tokens FastV keeps);
    - an ``IllavaConfig``, used as given;
    - the path of a file written by ``illava tune`` (``"tuned.json"``): the setting it chose, refused
      when the file was tuned for another family or size (``illava.tuned``).

    Keyword ``overrides`` replace fields of the result (``recycle="cluster"``, ``llm_layers=(4,)``).
    ``encoder_layers="measured"`` moves the result's encoder merges (as many layers) to those the
    measured rule picks from the profile ``illava.tools.schedule.measure`` remembered for ``model``
    (docs/method.md, "Where the encoder stage merges").
    """
    adapter = adapter_for(model)
    if config is None:
        config = "image"
    if tuned.is_tuned_path(config):
        if knob is not None:
            raise TypeError(f"knob={knob!r}: a tuned file carries its own knob")
        data = tuned.read(config)
        tuned.check_model(data, {"model_type": model.config.model_type, **adapter.dimensions(model).as_dict()}, config)
        config, knob, fields = tuned.spec_of(data)
        overrides = {**fields, **overrides}
    if isinstance(config, str) and config in METHODS:
        cfg = REGISTRY[config].config(model, knob)
    elif knob is not None:
        what = f"preset {config!r}" if isinstance(config, str) else "an IllavaConfig"
        raise TypeError(f"knob={knob!r}: only a method takes a knob, not {what}; methods: {', '.join(METHODS)}")
    elif isinstance(config, str) and config in PRESETS:
        cfg = adapter.preset(model, config)
    elif isinstance(config, str):
        raise ValueError(unknown_name(config))
    elif isinstance(config, IllavaConfig):
        cfg = config
    else:
        raise TypeError(f"config must be a preset name, a method name or an IllavaConfig, got {type(config).__name__}")
    if isinstance(overrides.get("encoder_layers"), str):
        cfg = _measured(model, cfg, overrides.pop("encoder_layers"))
    cfg = cfg.replace(**overrides) if overrides else cfg
    cfg.check_against(**adapter.dimensions(model).as_dict())
    adapter.check(model, cfg)
    return cfg


def _measured(model, cfg: IllavaConfig, how: str) -> IllavaConfig:
    from .plan.schedule import measured_layers

    if how != "measured":
        raise ValueError(f"encoder_layers takes layer indices or 'measured', got {how!r}")
    if not cfg.encoder_layers:
        raise ValueError("encoder_layers='measured': this configuration has no encoder stage to move")
    return cfg.replace(encoder_layers=measured_layers(model, len(cfg.encoder_layers)))


def resolve_config(model: torch.nn.Module, config: IllavaConfig | str | None = "image", **overrides) -> IllavaConfig:
    """Deprecated alias of ``configure`` (the name before 0.2.0, same arguments without the knob):
    kept for the 0.3 releases, not in ``illava.__all__``; to be removed in 0.4.0."""
    warnings.warn(
        "illava.resolve_config is deprecated and will be removed in illava 0.4.0: use "
        "illava.configure(model, config, **overrides), which also takes a method's knob",
        DeprecationWarning,
        stacklevel=2,
    )
    return configure(model, config, **overrides)


def unknown_name(name: str) -> str:
    """The message for a configuration name that is neither a preset nor a method."""
    return f"{name!r} is an unknown method or preset name; presets: {', '.join(PRESETS)}; methods: {', '.join(METHODS)}"


def apply(
    model: torch.nn.Module, config: IllavaConfig | str | None = "image", knob: float | None = None, **overrides
) -> IllavaConfig:
    """Turn iLLaVA on for a loaded model, in place; returns the configuration in use.

    ``config``, ``knob`` and ``overrides`` are those of ``configure``: a preset name (``PRESETS``)
    scaled to the model, a method name (``METHODS``) at its published default or at ``knob``, or
    an ``IllavaConfig``; keyword ``overrides`` replace fields.
    Applying again replaces the previous configuration (if the new one is invalid, the previous
    one stays). ``remove`` restores stock behaviour.
    """
    cfg = configure(model, config, knob, **overrides)
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


def _state(model: torch.nn.Module) -> IllavaState:
    if not is_applied(model):
        raise ValueError("illava is not applied to this model; call illava.apply(model) first")
    return model._illava.state
