"""Matched budgets: solve a method's knob so that its analytic prefill FLOPs hit a share of stock's.

Every method of ``illava.methods.REGISTRY`` has one knob, monotone in how much it reduces (from
``Method.low``, the least, to ``Method.high``, the most). For a target share ``s`` of the stock
prefill FLOPs of given inputs, ``solve`` finds the configuration with the *least* reduction whose
FLOPs are at most ``s`` of stock's: it brackets the knob and narrows the bracket (interpolation and
bisection in turn) until its two ends differ by at most one token at every point where the method
reduces (per crop / frame at an encoder layer, per image / video at the feature stage, per sample
at an LLM layer). The lower end is then over the target and the answer under it, within one token
per stage.

FLOPs come from ``illava.tools.flops.prefill_flops`` on the token counts of a real forward pass of
the model on the inputs. Every method here keeps a fixed number of tokens for given input shapes,
so counts barely depend on the pixel values; the exception is LLaVA-OneVision's row-end tokens,
which follow the rows where survivors lie (about 1 % of the visual tokens of a 1280x720 image).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import api
from ..adapters import adapter_for
from ..config import IllavaConfig
from ..methods import REGISTRY, Method
from .flops import prefill_flops


@dataclass
class Point:
    knob: float
    config: IllavaConfig | None  # None: the knob gives no valid configuration (removes too much)
    gflops: float = float("inf")
    tokens: dict = field(default_factory=dict)
    signature: dict = field(default_factory=dict)  # reduction point -> (tokens, one token there)

    @property
    def valid(self) -> bool:
        return self.config is not None


@dataclass
class Solved:
    method: str
    target: float  # share of stock prefill FLOPs asked for
    knob: float
    config: IllavaConfig
    share: float  # share achieved
    gflops: float
    stock_gflops: float
    tokens: dict  # visual tokens: stock, after the encoder stage, after the LLM stage
    reached: bool  # False: the method cannot go as low as the target; ``knob`` is its most reducing valid value
    steps: int  # forward passes spent

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "target": self.target,
            "knob": self.knob,
            "config": str(self.config),
            "share": self.share,
            "gflops": self.gflops,
            "stock_gflops": self.stock_gflops,
            "tokens": self.tokens,
            "reached": self.reached,
            "steps": self.steps,
        }


class Meter:
    """Prefill FLOPs of configurations of one model on fixed inputs (the model's own patch state
    is restored by ``close``)."""

    def __init__(self, model, inputs: dict):
        self.model = model
        self.inputs = inputs
        self.unit = adapter_for(model).unit
        self.sequence = int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else None
        self.batch = int(inputs["input_ids"].shape[0])
        self.previous = api.config_of(model) if api.is_applied(model) else None
        self.forwards = 0
        self.stock = self.point(None, IllavaConfig())  # no stage: stock compute, counted

    def point(self, knob, config: IllavaConfig) -> Point:
        try:
            api.apply(self.model, config)
            with torch.inference_mode():
                self.model(**self.inputs, use_cache=False, logits_to_keep=1)
        except ValueError:  # the knob removes more than there is (found at construction or run time)
            return Point(knob, None)
        finally:
            self.forwards += 1
        stats = api.stats(self.model)
        sequence = self.sequence if self.sequence is not None else int(self.inputs["input_ids"].shape[1])
        gflops = prefill_flops(self.model, stats, sequence, self.batch)["total"]
        return Point(knob, config, gflops, stats.visual_tokens(), self._signature(stats))

    def _signature(self, stats) -> dict:
        out = {}
        for i, call in enumerate(stats.encoder):
            for layer, _, n_out in call["layers"]:
                out[("encoder", i, layer)] = (n_out, call["crops"] * self.unit)
        out[("features",)] = (sum(item.tokens for item in stats.items), max(1, len(stats.items)))
        for layer in stats.llm:
            out[("llm", layer.layer)] = (sum(layer.visual_out), max(1, len(layer.visual_out)))
        return out

    def close(self) -> None:
        if self.previous is None:
            api.remove(self.model)
        else:
            api.apply(self.model, self.previous)


def adjacent(a: Point, b: Point) -> bool:
    """At most one token apart at every reduction point (both valid, same points)."""
    if not (a.valid and b.valid) or a.signature.keys() != b.signature.keys():
        return False
    return all(abs(n - b.signature[key][0]) <= one for key, (n, one) in a.signature.items())


def solve(model, method: str | Method, target: float, inputs: dict, *, max_steps: int = 60, meter=None) -> Solved:
    """The least-reducing configuration of ``method`` with prefill FLOPs at most ``target`` of
    stock's on ``inputs`` (module docstring)."""
    if not 0 < target <= 1:
        raise ValueError(f"a FLOPs budget is a share of stock's in (0, 1], got {target!r}")
    m = REGISTRY[method] if isinstance(method, str) else method
    own = meter is None
    meter = meter or Meter(model, inputs)
    start = meter.forwards
    try:
        stock = meter.stock.gflops

        def at(knob: float) -> Point:
            try:
                config = m.config(model, knob)
                api.configure(model, config)
            except ValueError:
                return Point(knob, None)
            return meter.point(knob, config)

        def share(p: Point) -> float:
            return p.gflops / stock

        lo, hi = at(m.low), at(m.high)
        if lo.valid and share(lo) <= target:
            hi = lo
        else:
            step = 0
            while not adjacent(lo, hi) and step < max_steps and abs(hi.knob - lo.knob) > 1e-9 * abs(m.high - m.low):
                width = hi.knob - lo.knob
                knob = lo.knob + width / 2
                if step % 2 == 0 and lo.valid and hi.valid and share(lo) > share(hi):
                    fraction = (share(lo) - target) / (share(lo) - share(hi))
                    knob = lo.knob + width * min(0.9, max(0.1, fraction))
                p = at(knob)
                if p.valid and share(p) > target:
                    lo = p
                else:
                    hi = p
                step += 1
        reached = hi.valid and share(hi) <= target
        best = hi if hi.valid else lo  # unreachable target: the most reducing valid knob
        if not best.valid:
            raise ValueError(f"{m.name}: no valid configuration between knob {m.low} and {m.high} on these inputs")
        return Solved(
            m.name, target, best.knob, best.config, share(best), best.gflops, stock, best.tokens, reached,
            meter.forwards - start,
        )  # fmt: skip
    finally:
        if own:
            meter.close()


def solve_all(model, methods, targets, inputs: dict, progress=None) -> list[Solved]:
    """``solve`` for every method and target (one stock measurement); ``progress(solved)`` after each."""
    meter = Meter(model, inputs)
    out = []
    try:
        for method in methods:
            for target in targets:
                out.append(solve(model, method, target, inputs, meter=meter))
                if progress:
                    progress(out[-1])
    finally:
        meter.close()
    return out
