"""One call to turn iLLaVA on, one to turn it off."""

from __future__ import annotations

import warnings

import torch

from .adapters import adapter_for
from .config import IllavaConfig
from .hf.llm import LLMStage
from .methods import target_of
from .patch import PatchRecord
from .resolve import resolve
from .state import IllavaState, Stats


def configure(
    model: torch.nn.Module, config: IllavaConfig | str | None = "image", knob: float | None = None, **overrides
) -> IllavaConfig:
    """The configuration ``apply`` would use for ``model``, checked against it (``illava.resolve``,
    the resolver the vLLM plugin shares, then the family adapter's checks).

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
    cfg = resolve(target_of(model), "image" if config is None else config, knob, overrides)
    adapter.check(model, cfg)
    return cfg


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
    LLMStage(state, parts.decoder, adapter.decoder_family()).attach(record, parts.inner)


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
