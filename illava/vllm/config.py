"""How the vLLM plugin is configured, and what it refuses.

The configuration (the *spec*) comes from the model configuration's ``illava`` field, set with
vLLM's ``--hf-overrides '{"illava": SPEC}'`` (``LLM(..., hf_overrides={"illava": SPEC})``), or from the
environment variable ``ILLAVA_VLLM`` (a name or JSON); the field wins when both are set. A spec is

- a preset name (``encoder-only``, ``off``; ``image`` where the family's preset has no LLM stage),
- a method whose reduction happens before the LLM (``tome``, ``visionzip``, ``pool``, ``divprune``,
  ``random``),
- or a mapping: ``{"preset" | "method": NAME, "knob": VALUE, FIELD: VALUE, ...}`` (field overrides,
  as ``illava.configure(model, NAME, KNOB, **fields)``), or only ``IllavaConfig`` fields
  (``{"encoder_layers": [5, 6], "encoder_removal": 72}``),
- or the path of a file written by ``illava tune --engine vllm`` (``tuned.json``: its spec, refused
  when it was tuned for another family or size).

The plugin runs the encoder stage (and the feature stage of DivPrune / random): vLLM assigns
positions and KV slots before the model runs, so the LLM stage cannot run; a configuration with
LLM layers is refused with the change to make, never silently cut down.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import tuned
from ..config import PRESETS, IllavaConfig
from ..families import Dimensions
from ..methods import REGISTRY, Target
from ..presets import preset
from ..resolve import resolve as shared_resolve

ENV = "ILLAVA_VLLM"
FIELD = "illava"

# where each method acts comes from the registry (``Method.stages``): the plugin serves those that cut
# before the LLM (iLLaVA's variants where the family's preset has no LLM stage: checked on the result)
LLM_METHODS = tuple(name for name, m in REGISTRY.items() if m.stages == ("llm",))
MEASURED_METHODS = tuple(name for name, m in REGISTRY.items() if m.measured)  # profiled with transformers
SERVED_METHODS = tuple(name for name in REGISTRY if name not in LLM_METHODS + MEASURED_METHODS)


@dataclass(frozen=True)
class Family:
    """What the plugin needs of a served model, read from its family record (``illava.families``,
    ``illava.vllm.families``): its dimensions, its unit of removal, the layers where it may merge,
    and the configuration its presets scale to (``illava.presets.preset``)."""

    name: str  # how messages name the family
    encoder_depth: int
    tokens_per_crop: int  # 0: dynamic resolution
    llm_depth: int
    feature_layer: int
    unit: int
    mergeable: tuple[int, ...]
    model_type: str = ""  # the configuration's model_type (what a tuned file names)
    hf_config: object = field(default=None, compare=False, repr=False)  # what presets scale to


def spec_of(hf_config) -> object | None:
    """The spec of a served model: its config's ``illava`` field, else ``ILLAVA_VLLM``, else None."""
    spec = getattr(hf_config, FIELD, None)
    if spec is None:
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return None
        try:
            spec = json.loads(raw)
        except json.JSONDecodeError:
            spec = raw  # a bare name
    if isinstance(spec, str) and spec.strip().startswith("{"):
        spec = json.loads(spec)
    return spec


_RESOLVED: dict[tuple[int, object], tuple[weakref.ref, str, object]] = {}


def once_per_model(hf_config, build: Callable[[object], object]) -> object:
    """``build(hf_config)`` (a family's stage, resolved from the model's spec), made once per served
    model configuration and spec, not at every call of the processor or the model: the processor
    asks for every image's token count. A configuration that cannot be weakly referenced is built
    every time."""
    spec = json.dumps(spec_of(hf_config), sort_keys=True, default=str)
    key = (id(hf_config), build)
    hit = _RESOLVED.get(key)
    if hit is not None and hit[0]() is hf_config and hit[1] == spec:
        return hit[2]
    made = build(hf_config)
    try:
        ref = weakref.ref(hf_config)
    except TypeError:
        return made
    for dead in [k for k, (r, _, _) in _RESOLVED.items() if r() is None]:
        del _RESOLVED[dead]
    _RESOLVED[key] = (ref, spec, made)
    return made


def resolve(spec, family: Family) -> IllavaConfig | None:
    """The ``IllavaConfig`` of ``spec`` for ``family`` (``None``: off), checked: the resolver of both
    engines (``illava.resolve``) on the family's ``Target``, then the plugin's own refusals, each a
    ``ValueError`` with what to change."""
    if spec is None:
        return None
    target = _Target(family)
    if tuned.is_tuned_path(spec):  # a file of `illava tune`: its spec, for the model it was tuned for
        data = tuned.read(spec)
        try:
            tuned.check_model(data, target.identity(), spec)
        except ValueError as error:
            raise ValueError(f"illava.vllm: {error}") from None
        name, knob, fields = tuned.spec_of(data)  # read and checked once: the resolver gets the spec itself
        what = name
    elif isinstance(spec, str):
        name, knob, fields = spec, None, {}
        what = name
    elif isinstance(spec, dict):
        fields = dict(spec)
        name = fields.pop("preset", None) or fields.pop("method", None)
        knob = fields.pop("knob", None)
        what = name
        if name is None and knob is not None:
            raise ValueError("illava.vllm: 'knob' needs a 'method'")
    else:
        raise ValueError(f"illava.vllm: the illava configuration must be a name or a mapping, got {spec!r}")
    if what in MEASURED_METHODS:
        raise ValueError(
            f"illava.vllm: the method {what!r} picks its layers from a profile measured with the transformers backend "
            '(illava.tools.schedule.measure); give the layers it chose instead: {"method": "illava", '
            '"encoder_layers": [...]}'
        )
    if what in LLM_METHODS:
        raise ValueError(
            f"illava.vllm: the method {what!r} prunes inside the LLM (the LLM stage), which vLLM cannot run: "
            "positions and KV slots are assigned before the model runs. Methods that cut before the LLM: "
            f"{', '.join(SERVED_METHODS)}"
        )
    if isinstance(what, str) and what not in PRESETS and what not in REGISTRY:
        raise ValueError(
            f"illava.vllm: unknown preset or method {what!r}; presets: {', '.join(PRESETS)}; "
            f"methods served in vLLM: {', '.join(SERVED_METHODS)}"
        )
    if what in PRESETS and knob is not None:
        raise ValueError(f"illava.vllm: knob={knob!r}: only a method takes a knob, not preset {what!r}")
    try:
        config = shared_resolve(target, name, knob, _fields(fields))
    except ValueError as error:
        raise ValueError(f"illava.vllm ({family.name}): {error}") from None
    if isinstance(what, str) and what.startswith("illava") and what in REGISTRY and config.llm_layers:
        raise ValueError(
            f"illava.vllm: the method {what!r} scales the 'image' preset, whose LLM stage vLLM cannot run; "
            "use 'illava-encoder' (its encoder stage alone) or the preset 'encoder-only'"
        )
    check(config, family, what)
    return config if config.enabled else None


def check(config: IllavaConfig, family: Family, name: str | None = None) -> None:
    if config.llm_layers:
        what = f"the preset {name!r}" if name in PRESETS else "this configuration"
        hint = "the preset 'encoder-only' (the encoder stage of 'image')" if name in PRESETS else "llm_layers=()"
        raise ValueError(
            f"illava.vllm: {what} has an LLM stage (llm_layers={config.llm_layers}), which vLLM cannot run: "
            f"positions and KV slots are assigned before the model runs. Use {hint}; the plugin never drops "
            "the LLM stage silently"
        )
    bad = [layer for layer in config.encoder_layers if layer not in family.mergeable]
    if bad:
        raise ValueError(
            f"illava.vllm: {family.name} merges only at encoder layers {list(family.mergeable)}; got {bad}"
        )


def _fields(fields: dict) -> dict:
    """JSON values as ``IllavaConfig`` takes them (lists -> tuples; a policy by its method name)."""
    out = {}
    for key, value in fields.items():
        if isinstance(value, list):
            value = tuple(value)
        out[key] = value
    if "policy" in out:
        raise ValueError("illava.vllm: a policy is chosen by its method name ('method': 'tome', ...)")
    known = {f.name for f in dataclasses.fields(IllavaConfig)} - {"policy", "preset"}
    unknown = sorted(set(out) - known)
    if unknown:
        raise ValueError(
            f"illava.vllm: unknown field(s) {unknown} of the illava configuration; fields: {', '.join(sorted(known))} "
            "(and 'preset' or 'method', 'knob')"
        )
    return out


class _Target(Target):
    """A served model as the resolver and the methods' builders read it."""

    def __init__(self, family: Family):
        self.family = family
        self.unit, self.mergeable, self.llm_depth = family.unit, family.mergeable, family.llm_depth
        self.model_type = family.model_type or family.name
        self.dimensions = Dimensions(
            family.encoder_depth, family.tokens_per_crop, family.llm_depth, family.feature_layer, family.unit
        )

    def preset(self, name: str) -> IllavaConfig:
        return preset(self.family.hf_config, name)  # as the transformers backend's adapters scale it
