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
from dataclasses import dataclass, field

from .. import tuned
from ..config import PRESETS, IllavaConfig
from ..methods import REGISTRY, Target
from ..presets import preset

ENV = "ILLAVA_VLLM"
FIELD = "illava"

# methods whose reduction happens before the LLM (their builders, on a family's dimensions)
ENCODER_METHODS = (
    "illava", "illava-rank", "illava-cluster", "illava-prune", "illava-encoder", "random-encoder", "tome-illava",
    "tome", "visionzip", "pool",
)  # fmt: skip
FEATURE_METHODS = ("divprune", "random")
LLM_METHODS = ("fastv", "pdrop", "illava-llm")
MEASURED_METHODS = ("illava-measured",)  # the layer profile is measured with the transformers backend


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


def resolve(spec, family: Family) -> IllavaConfig | None:
    """The ``IllavaConfig`` of ``spec`` for ``family`` (``None``: off), checked; ``ValueError`` with
    what to change for what the plugin cannot serve."""
    if spec is None:
        return None
    if tuned.is_tuned_path(spec):  # a file of `illava tune`: its spec, for the model it was tuned for
        data = tuned.read(spec)
        identity = {
            "model_type": family.model_type or family.name,
            "encoder_depth": family.encoder_depth,
            "tokens_per_crop": family.tokens_per_crop,
            "llm_depth": family.llm_depth,
            "feature_layer": family.feature_layer,
            "unit": family.unit,
        }
        try:
            tuned.check_model(data, identity, spec)
        except ValueError as error:
            raise ValueError(f"illava.vllm: {error}") from None
        spec = data["spec"]
    if isinstance(spec, str):
        name, knob, fields = spec, None, {}
    elif isinstance(spec, dict):
        fields = dict(spec)
        name = fields.pop("preset", None) or fields.pop("method", None)
        knob = fields.pop("knob", None)
    else:
        raise ValueError(f"illava.vllm: the illava configuration must be a name or a mapping, got {spec!r}")
    if name is None:
        if knob is not None:
            raise ValueError("illava.vllm: 'knob' needs a 'method'")
        config = IllavaConfig(**_fields(fields))
    elif name in PRESETS:
        if knob is not None:
            raise ValueError(f"illava.vllm: knob={knob!r}: only a method takes a knob, not preset {name!r}")
        config = _preset(name, family).replace(**_fields(fields))
    elif name in ENCODER_METHODS + FEATURE_METHODS:
        config = _method(name, knob, family).replace(**_fields(fields))
    elif name in MEASURED_METHODS:
        raise ValueError(
            f"illava.vllm: the method {name!r} picks its layers from a profile measured with the transformers backend "
            '(illava.tools.schedule.measure); give the layers it chose instead: {"method": "illava", '
            '"encoder_layers": [...]}'
        )
    elif name in LLM_METHODS:
        raise ValueError(
            f"illava.vllm: the method {name!r} prunes inside the LLM (the LLM stage), which vLLM cannot run: "
            "positions and KV slots are assigned before the model runs. Methods that cut before the LLM: "
            f"{', '.join(ENCODER_METHODS + FEATURE_METHODS)}"
        )
    else:
        raise ValueError(
            f"illava.vllm: unknown preset or method {name!r}; presets: {', '.join(PRESETS)}; "
            f"methods served in vLLM: {', '.join(ENCODER_METHODS + FEATURE_METHODS)}"
        )
    check(config, family, name)
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
    try:
        config.check_against(
            encoder_depth=family.encoder_depth,
            tokens_per_crop=family.tokens_per_crop,
            llm_depth=family.llm_depth,
            feature_layer=family.feature_layer,
            unit=family.unit,
        )
    except ValueError as error:
        raise ValueError(f"illava.vllm ({family.name}): {error}") from None
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


def _preset(name: str, family: Family) -> IllavaConfig:
    return preset(family.hf_config, name)  # as the transformers backend's adapters scale it


def _method(name: str, knob, family: Family) -> IllavaConfig:
    """A method of ``illava.methods.REGISTRY`` built on the family's dimensions, as it is built on a
    transformers model (the same builders, defaults and knobs)."""
    config = REGISTRY[name].config(_Target(family), knob)
    if name.startswith("illava") and config.llm_layers:
        raise ValueError(
            f"illava.vllm: the method {name!r} scales the 'image' preset, whose LLM stage vLLM cannot run; "
            "use 'illava-encoder' (its encoder stage alone) or the preset 'encoder-only'"
        )
    return config


class _Target(Target):
    def __init__(self, family: Family):
        self.family = family
        self.unit, self.mergeable, self.llm_depth = family.unit, family.mergeable, family.llm_depth

    def preset(self, name: str) -> IllavaConfig:
        return _preset(name, self.family)
