"""iLLaVA and its peers, by name: each a configuration of the stages plus a policy, with its
published default and one knob (what a FLOPs budget solves for). docs/peers.md describes them.

    illava.apply(model, "fastv")          # published default
    illava.apply(model, "fastv", 0.25)    # knob: share of visual tokens kept
    illava.configure(model, "fastv", 0.25)  # the configuration, without applying it

``METHODS`` are the names; ``REGISTRY`` maps each to its ``Method`` (knob, range, builder).

| method | where | knob (default) |
|---|---|---|
| ``illava`` | encoder layers + LLM layers (the ``image`` preset, its recycle mode) | reduction level (1.0) |
| ``illava-rank``, ``illava-cluster``, ``illava-prune`` | the same with that recycle mode | reduction level (1.0) |
| ``illava-encoder``, ``illava-llm`` | one stage of ``illava`` (its layers and counts) | reduction level (1.0) |
| ``illava-measured`` | ``illava`` with encoder layers chosen by measurement (``illava.tools.schedule``) | level (1.0) |
| ``random-encoder`` | control: ``illava-encoder``'s layers and counts, random scores | reduction level (1.0) |
| ``tome-illava`` | ``illava``'s two stages: ToMe's matching at its encoder layers, its LLM stage | level (1.0) |
| ``fastv`` | LLM, before layer 2, all-query attention, pruned | keep share (0.5) |
| ``pdrop`` | LLM, at 1/4, 1/2, 3/4 of the depth, last-token attention, pruned | keep share per cut (0.5) |
| ``tome`` | every encoder layer, bipartite matching, proportional attention | units per layer (8; may be fractional) |
| ``visionzip`` | the encoder's feature layer: dominant + contextual tokens | keep share (1/3) |
| ``divprune`` | projected tokens before the LLM: max-min diversity | keep share (0.1) |
| ``random`` | projected tokens before the LLM: random subset (control) | keep share (1/3) |
| ``pool`` | the encoder's feature layer: average pooling of every crop (control) | keep share (1/3) |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .config import IllavaConfig
from .policy import DivPrune, FastV, PDrop, Pool, RandomDrop, RandomScores, ToMe, ToMeThenIllava, VisionZip


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    knob: str
    default: float
    low: float  # knob value with the least reduction
    high: float  # knob value with the most reduction
    build: Callable[[object, float], IllavaConfig]
    # where it acts: "encoder" (inside the vision encoder), "features" (the projected tokens before the
    # LLM), "llm" (inside the LLM); an engine's refusals derive from it (``illava.vllm.config``)
    stages: tuple[str, ...] = ("encoder",)
    measured: bool = False  # its encoder layers come from a profile measured on the model (``illava.tools.schedule``)

    def config(self, model, value: float | None = None) -> IllavaConfig:
        """The method's configuration for ``model`` (a ``Target``: the dimensions of a served model, or
        a model of an engine that registered its targets, ``register_target``: a transformers model
        once ``illava.adapters`` is imported) at ``value`` of its knob."""
        value = self.default if value is None else value
        return self.build(target_of(model), float(value)).replace(preset=self.name)


class Target:
    """What the methods' builders and the resolver (``illava.resolve``) read of a model: ``unit``
    (patch tokens removed together), ``mergeable`` (encoder layers where the encoder stage may merge),
    ``llm_depth``, its ``dimensions`` (``illava.families.Dimensions``, what a configuration is checked
    against), its ``model_type`` and its ``preset(name)``. ``illava.vllm`` gives one for a served
    model; transformers models get theirs from their adapter."""

    unit: int
    mergeable: tuple[int, ...]
    llm_depth: int
    dimensions: object  # ``illava.families.Dimensions``
    model_type: str = ""

    def identity(self) -> dict:
        """What a tuned file is checked against (``illava.tuned.check_model``)."""
        return {"model_type": self.model_type, **self.dimensions.as_dict()}

    def preset(self, name: str) -> IllavaConfig:
        raise NotImplementedError

    def measured_layers(self, count: int) -> tuple[int, ...]:
        """``count`` encoder merge layers chosen by measurement (``illava.tools.schedule``)."""
        raise ValueError("illava-measured: the measured layer schedule needs the transformers backend")


# how the engines turn their models into targets (``register_target``); the methods import no engine
_TARGET_MAKERS: list[Callable[[object], Target | None]] = []


def register_target(make: Callable[[object], Target | None]) -> None:
    """Let ``Method.config`` take an engine's models: ``make(model)`` gives the model's ``Target``, or
    ``None`` for a model that is not the engine's (the transformers backend registers its own in
    ``illava.adapters``)."""
    if make not in _TARGET_MAKERS:
        _TARGET_MAKERS.append(make)


def target_of(model) -> Target:
    """``model`` as the methods' builders read it: a ``Target`` as it is, else the first registered
    engine's; ``TypeError`` when no engine takes it."""
    if isinstance(model, Target):
        return model
    for make in _TARGET_MAKERS:
        target = make(model)
        if target is not None:
            return target
    raise TypeError(
        f"illava.methods: no engine takes a {type(model).__name__}; give a Target, or import the engine first "
        "(transformers models: illava.configure, or import illava.adapters)"
    )


def scale_reduction(base: IllavaConfig, level: float, unit: int = 1) -> IllavaConfig:
    """``base`` with its reduction scaled by ``level`` (0 = none, 1 = as given, > 1 = more); counts
    stay whole ``unit`` s, fractions at most 0.9, keep ratios at least 0.05."""

    def removal(r):
        return round(r * level / unit) * unit if isinstance(r, int) else min(0.9, r * level)

    def keep(k):
        return max(0.05, 1 - (1 - k) * level)

    removals = base.encoder_removal
    keeps = base.llm_keep_ratio
    return base.replace(
        encoder_removal=tuple(map(removal, removals)) if isinstance(removals, tuple) else removal(removals),
        llm_keep_ratio=tuple(map(keep, keeps)) if isinstance(keeps, tuple) else keep(keeps),
        preset=None,
    )


def _illava(model: Target, level: float, recycle: str | None = None) -> IllavaConfig:
    config = scale_reduction(model.preset("image"), level, model.unit)
    return config if recycle is None else config.replace(recycle=recycle)


def _illava_stage(model: Target, level: float, stage: str, policy=None) -> IllavaConfig:
    """One stage of ``illava`` at ``level``: its layers and counts, the other stage off."""
    config = _illava(model, level)
    if stage == "encoder":
        return config.replace(llm_layers=(), llm_keep_ratio=1.0, policy=policy)
    return config.replace(encoder_layers=(), encoder_removal=0, policy=policy)


def _illava_measured(model: Target, level: float) -> IllavaConfig:
    """``illava`` at ``level`` with its encoder merges moved to the measured layers (as many)."""
    config = _illava(model, level)
    if not config.encoder_layers:
        return config
    return config.replace(encoder_layers=model.measured_layers(len(config.encoder_layers)))


def _fastv(model: Target, keep: float) -> IllavaConfig:
    return IllavaConfig(llm_layers=(min(2, model.llm_depth - 1),), llm_keep_ratio=keep, policy=FastV())


def _pdrop(model: Target, keep: float) -> IllavaConfig:
    layers = tuple(dict.fromkeys(max(1, round(model.llm_depth * s / 4)) for s in (1, 2, 3)))
    return IllavaConfig(llm_layers=layers, llm_keep_ratio=keep, policy=PDrop())


def _tome(model: Target, r: float) -> IllavaConfig:
    """``r`` units merged per layer; a fractional ``r`` merges floor((i+1) r) - floor(i r) at the
    i-th layer (the same total as r per layer, spread evenly), so a budget can be met to one unit."""
    layers = model.mergeable
    per_layer = tuple(
        (math.floor((i + 1) * r + 1e-9) - math.floor(i * r + 1e-9)) * model.unit for i in range(len(layers))
    )
    return IllavaConfig(encoder_layers=layers, encoder_removal=per_layer, policy=ToMe())


def _last_layer(model: Target, keep: float, policy) -> IllavaConfig:
    return IllavaConfig(encoder_layers=(max(model.mergeable),), encoder_removal=round(1 - keep, 6), policy=policy)


BOTH = ("encoder", "llm")  # iLLaVA's two stages (the LLM stage where the family's preset has one)

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("illava", "iLLaVA: encoder + LLM stages (image preset)", "level", 1.0, 0.0, 4.0, _illava, BOTH),
        *(
            Method(
                f"illava-{mode}",
                f"iLLaVA, recycle {mode}",
                "level",
                1.0,
                0.0,
                4.0,
                lambda model, level, mode=mode: _illava(model, level, mode),
                BOTH,
            )
            for mode in ("rank", "cluster", "prune")
        ),
        Method(
            "illava-encoder",
            "iLLaVA's encoder stage alone",
            "level",
            1.0,
            0.0,
            8.0,
            lambda model, level: _illava_stage(model, level, "encoder"),
        ),
        Method(
            "illava-llm",
            "iLLaVA's LLM stage alone",
            "level",
            1.0,
            0.0,
            4.0,
            lambda model, level: _illava_stage(model, level, "llm"),
            ("llm",),
        ),
        Method(
            "illava-measured",
            "iLLaVA, encoder layers by measurement",
            "level",
            1.0,
            0.0,
            4.0,
            _illava_measured,
            BOTH,
            measured=True,
        ),
        Method(
            "random-encoder",
            "control: iLLaVA's encoder stage with random scores",
            "level",
            1.0,
            0.0,
            8.0,
            lambda model, level: _illava_stage(model, level, "encoder", RandomScores()),
        ),
        Method(
            "tome-illava",
            "iLLaVA's two stages, ToMe's matching in the encoder",
            "level",
            1.0,
            0.0,
            4.0,
            lambda model, level: _illava(model, level).replace(policy=ToMeThenIllava()),
            BOTH,
        ),
        Method("fastv", "FastV: LLM layer 2, all-query attention, pruned", "keep", 0.5, 1.0, 0.02, _fastv, ("llm",)),
        Method("pdrop", "PyramidDrop: 3 LLM cuts, last-token attention", "keep", 0.5, 1.0, 0.05, _pdrop, ("llm",)),
        Method("tome", "ToMe: bipartite merging in every encoder layer", "r", 8, 0, 64, _tome),
        Method(
            "visionzip",
            "VisionZip: dominant + contextual at the feature layer",
            "keep",
            1 / 3,
            1.0,
            0.01,
            lambda model, keep: _last_layer(model, keep, VisionZip()),
        ),  # fmt: skip
        Method(
            "divprune",
            "DivPrune: max-min diverse subset before the LLM",
            "keep",
            0.1,
            1.0,
            0.01,
            lambda model, keep: IllavaConfig(feature_keep=keep, policy=DivPrune()),
            ("features",),
        ),  # fmt: skip
        Method(
            "random",
            "control: random subset before the LLM",
            "keep",
            1 / 3,
            1.0,
            0.01,
            lambda model, keep: IllavaConfig(feature_keep=keep, policy=RandomDrop()),
            ("features",),
        ),  # fmt: skip
        Method(
            "pool",
            "control: average pooling at the feature layer",
            "keep",
            1 / 3,
            1.0,
            0.01,
            lambda model, keep: _last_layer(model, keep, Pool()),
        ),  # fmt: skip
    )
}


METHODS: tuple[str, ...] = tuple(REGISTRY)
