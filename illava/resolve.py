"""One resolver behind both engines: a configuration as users give it, to a checked ``IllavaConfig``
for one model.

``illava.configure`` (transformers) and ``illava.vllm.config.resolve`` (vLLM) both call ``resolve``
with the model's ``illava.methods.Target`` (what the methods' builders read, its presets and its
dimensions); each engine adds only its own refusals (the adapter's ``check``; vLLM's: no LLM stage,
merges only where it can). A configuration is

- a preset name (``illava.config.PRESETS``), scaled to the model by ``target.preset``;
- a method name (``illava.methods.REGISTRY``) at its default or at ``knob``;
- an ``IllavaConfig``, as given; ``None``: the field overrides alone, on ``IllavaConfig()``;
- the path of a file of ``illava tune`` (``illava.tuned``): its spec, refused for another model;

then ``overrides`` (``IllavaConfig`` fields; ``encoder_layers="measured"``: the encoder merges moved to
the layers measured on the model, ``illava.plan.schedule``), then the check against the model's
dimensions. Nothing here imports an engine.
"""

from __future__ import annotations

from . import tuned
from .config import PRESETS, IllavaConfig
from .methods import METHODS, REGISTRY, Target


def resolve(target: Target, config, knob: float | None = None, overrides: dict | None = None) -> IllavaConfig:
    """The checked ``IllavaConfig`` of ``config`` (module docstring) for ``target``."""
    overrides = dict(overrides or {})
    if tuned.is_tuned_path(config):
        if knob is not None:
            raise TypeError(f"knob={knob!r}: a tuned file carries its own knob")
        data = tuned.read(config)
        tuned.check_model(data, target.identity(), config)
        config, knob, fields = tuned.spec_of(data)
        overrides = {**fields, **overrides}
    if isinstance(config, str) and config in METHODS:
        cfg = REGISTRY[config].config(target, knob)
    elif knob is not None:
        what = f"preset {config!r}" if isinstance(config, str) else "an IllavaConfig"
        raise TypeError(f"knob={knob!r}: only a method takes a knob, not {what}; methods: {', '.join(METHODS)}")
    elif isinstance(config, str) and config in PRESETS:
        cfg = target.preset(config)
    elif isinstance(config, str):
        raise ValueError(unknown_name(config))
    elif isinstance(config, IllavaConfig):
        cfg = config
    elif config is None:
        cfg = IllavaConfig()
    else:
        raise TypeError(f"config must be a preset name, a method name or an IllavaConfig, got {type(config).__name__}")
    if isinstance(overrides.get("encoder_layers"), str):
        cfg = _measured(target, cfg, overrides.pop("encoder_layers"))
    cfg = cfg.replace(**overrides) if overrides else cfg
    cfg.check_against(**target.dimensions.as_dict())
    return cfg


def _measured(target: Target, cfg: IllavaConfig, how: str) -> IllavaConfig:
    if how != "measured":
        raise ValueError(f"encoder_layers takes layer indices or 'measured', got {how!r}")
    if not cfg.encoder_layers:
        raise ValueError("encoder_layers='measured': this configuration has no encoder stage to move")
    return cfg.replace(encoder_layers=target.measured_layers(len(cfg.encoder_layers)))


def unknown_name(name: str) -> str:
    """The message for a configuration name that is neither a preset nor a method."""
    return f"{name!r} is an unknown method or preset name; presets: {', '.join(PRESETS)}; methods: {', '.join(METHODS)}"
