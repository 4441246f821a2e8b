"""Patching a model and undoing it. Everything ``apply`` changes is listed in one ``PatchRecord``
(``model._illava``), which ``remove`` walks; a patched module carries one attribute, ``_illava``.

Two kinds of change, both ToMe-style (no transformers code is copied):
- class swaps: a module gets a subclass of its own class with an illava mixin first in the MRO;
- hooks: forward (pre-)hooks that are ``Hook`` objects, not closures, so that ``copy.deepcopy`` of
  a patched model copies them with the model and the copy's hooks use the copy's state.

Inside ``torch.compile`` (Dynamo tracing) nothing of illava's bookkeeping can be traced. Every hook
then behaves as stock, and so does every swapped method of a call that removes nothing (text-only
prompts, a configuration without reductions, ``off``), so such forwards compile fully. A call that
removes tokens runs its swapped method (the inner model's forward: the whole call) eagerly instead,
``torch.compiler.disable``d: a graph break that gives the eager result, or with ``fullgraph=True``
Dynamo's error carrying illava's reason; never a silently stock or half-reduced result.
"""

from __future__ import annotations

import copyreg
import functools
import types
from dataclasses import dataclass, field

import torch

_SWAPPED: dict[tuple[type, type], type] = {}


class Swapped(type):
    """The metaclass of the classes ``PatchRecord.swap`` creates at run time. Pickle cannot find
    them by name; it rebuilds them from their mixin and original class instead, so a patched model
    pickles (``torch.save``) and loads back patched."""


def swapped_class(mixin: type, original: type) -> type:
    """The class ``mixin + original`` (one per pair, created on first use).

    The mixin's overrides, guarded for ``torch.compile`` (``stock_when_compiled``), are in the body
    the class is created with, so what runs at its creation wraps them in turn: transformers'
    ``GradientCheckpointingLayer`` wraps a layer class's ``forward`` in gradient checkpointing, which
    runs only where that wrapper is the class's outermost ``forward`` (set afterwards, a guard would
    hide it and the swapped layer would never be checkpointed). Methods a mixin adds when subclassed
    (``illava.hf.encoder.FeatureCalls``) guard themselves."""
    key = (mixin, original)
    if key not in _SWAPPED:
        name = f"{mixin.__name__}_{original.__name__}"
        body = {"_illava_original": original}
        for attr in _overridden(mixin, original):
            body[attr] = stock_when_compiled(attr, getattr(mixin, attr), getattr(original, attr))
        _SWAPPED[key] = Swapped(name, (mixin, original), body)
    return _SWAPPED[key]


copyreg.pickle(Swapped, lambda cls: (swapped_class, (cls.__bases__[0], cls._illava_original)))


def _overridden(mixin: type, original: type) -> list[str]:
    """The methods of ``original`` that ``mixin`` (with its bases) replaces."""
    names = []
    for klass in mixin.__mro__:
        if klass in original.__mro__:
            continue
        for attr, value in vars(klass).items():
            stock = original.__dict__.get(attr, None) or getattr(original, attr, None)
            plain = isinstance(value, types.FunctionType) and isinstance(stock, types.FunctionType)
            if plain and attr not in names and (not attr.startswith("__") or attr == "__call__"):
                names.append(attr)
    return names


EAGER = (
    "illava removes tokens in this forward, which torch.compile cannot trace: it runs eagerly (a graph "
    "break; under fullgraph=True this error). Forwards that remove nothing (text-only prompts, a "
    "configuration without reductions, illava.set_enabled(model, False)) compile as stock"
)


@torch.compiler.disable(reason=EAGER)
def run_eagerly(method, module, *args, **kwargs):
    """``method`` outside ``torch.compile``, in a call scope of its own (the scope-opening hook ran
    traced, as stock)."""
    state = module._illava.state
    with state.scope() as scope:
        scope.adopt(kwargs)
        return method(module, *args, **kwargs)


def stock_when_compiled(name: str, ours, stock):
    """Inside ``torch.compile``: stock where this call removes nothing, else ``ours`` run eagerly.
    (It reports the stock signature, which ``generate`` reads.)"""

    @functools.wraps(stock)
    def method(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            return ours(self, *args, **kwargs)
        state = self._illava.state
        # the inner model's forward knows whether the call holds visual inputs; the other methods
        # (feature calls, encoder layers, layouts) run only when it does
        if state.reduces(kwargs if name == "forward" and self._illava.layer is None else None):
            return run_eagerly(ours, self, *args, **kwargs)
        return stock(self, *args, **kwargs)

    return method


@dataclass
class ModulePatch:
    """What a swapped module knows, given when it is swapped: the shared state, for layers their
    index, and the geometry of the family's units (``unit`` tokens removed together after
    ``keep_first`` tokens never removed), so that the layer's helpers never ask the adapter."""

    state: object
    layer: int | None = None
    unit: int = 1
    keep_first: int = 0


class Hook:
    """Base of illava's hooks: holds the shared state; called like the function torch expects.
    ``compiled`` runs instead while Dynamo traces (default: nothing, as stock)."""

    def __init__(self, state):
        self.state = state

    def compiled(self, *args, **kwargs):
        return None


class Guard:
    """What torch calls: the hook, or inside ``torch.compile`` its ``compiled`` side."""

    def __init__(self, hook: Hook):
        self.hook = hook

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.hook.compiled(*args, **kwargs)
        return self.hook(*args, **kwargs)


@dataclass
class PatchRecord:
    state: object
    swapped: list[torch.nn.Module] = field(default_factory=list)
    hooks: list[tuple[torch.nn.Module, Guard, str]] = field(default_factory=list)

    def swap(self, module: torch.nn.Module, mixin: type, layer: int | None = None) -> None:
        """Give ``module`` the class ``mixin + type(module)``.

        accelerate's dispatch hooks keep the original bound ``forward`` in ``_old_forward``; it is
        rebound so that the patched forward runs on dispatched models too.
        """
        module.__class__ = swapped_class(mixin, type(module))
        adapter = getattr(self.state, "adapter", None)
        geometry = (adapter.unit, adapter.keep_first) if adapter is not None else (1, 0)
        module._illava = ModulePatch(self.state, layer, *geometry)
        if hasattr(module, "_old_forward"):
            module._old_forward = types.MethodType(module.__class__.forward, module)
        self.swapped.append(module)

    def hook(self, module: torch.nn.Module, hook: Hook, kind: str = "pre", always: bool = False) -> None:
        """Register ``hook`` on ``module``: ``pre`` (forward pre-hook) or ``post`` (forward hook),
        both with keyword arguments; ``always``: a forward hook that also runs when the forward
        raises (it ends per-call state)."""
        guard = Guard(hook)
        if kind == "pre":
            module.register_forward_pre_hook(guard, with_kwargs=True)
        else:
            module.register_forward_hook(guard, with_kwargs=True, always_call=always)
        self.hooks.append((module, guard, kind))

    def undo(self) -> None:
        for module, hook, kind in reversed(self.hooks):
            _remove_hook(module, hook, kind)
        for module in reversed(self.swapped):
            original = type(module)._illava_original
            module.__class__ = original
            module.__dict__.pop("_illava", None)
            if hasattr(module, "_old_forward"):
                module._old_forward = types.MethodType(original.forward, module)
        self.hooks.clear()
        self.swapped.clear()


def _remove_hook(module: torch.nn.Module, hook: Guard, kind: str) -> None:
    """Remove ``hook`` from ``module`` by identity (handles do not survive ``deepcopy``)."""
    if kind == "pre":
        main, extra = module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)
    else:
        main, extra = module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)
    for key in [k for k, v in main.items() if v is hook]:
        for table in (main, *extra):
            table.pop(key, None)
