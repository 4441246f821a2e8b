"""Patching a model and undoing it. Everything ``apply`` changes is listed in one ``PatchRecord``
(``model._illava``), which ``remove`` walks; a patched module carries one attribute, ``_illava``.

Two kinds of change, both ToMe-style (no transformers code is copied):
- class swaps: a module gets a subclass of its own class with an illava mixin first in the MRO;
- hooks: forward (pre-)hooks that are ``Hook`` objects, not closures, so that ``copy.deepcopy`` of
  a patched model copies them with the model and the copy's hooks use the copy's state.
"""

from __future__ import annotations

import copyreg
import types
from dataclasses import dataclass, field

import torch

_SWAPPED: dict[tuple[type, type], type] = {}


class Swapped(type):
    """The metaclass of the classes ``PatchRecord.swap`` creates at run time. Pickle cannot find
    them by name; it rebuilds them from their mixin and original class instead, so a patched model
    pickles (``torch.save``) and loads back patched."""


def swapped_class(mixin: type, original: type) -> type:
    """The class ``mixin + original`` (one per pair, created on first use)."""
    key = (mixin, original)
    if key not in _SWAPPED:
        name = f"{mixin.__name__}_{original.__name__}"
        _SWAPPED[key] = Swapped(name, (mixin, original), {"_illava_original": original})
    return _SWAPPED[key]


copyreg.pickle(Swapped, lambda cls: (swapped_class, (cls.__bases__[0], cls._illava_original)))


@dataclass
class ModulePatch:
    """What a swapped module knows: the shared state and, for layers, its index."""

    state: object
    layer: int | None = None


class Hook:
    """Base of illava's hooks: holds the shared state; called like the function torch expects."""

    def __init__(self, state):
        self.state = state


@dataclass
class PatchRecord:
    state: object
    swapped: list[torch.nn.Module] = field(default_factory=list)
    hooks: list[tuple[torch.nn.Module, Hook, str]] = field(default_factory=list)

    def swap(self, module: torch.nn.Module, mixin: type, layer: int | None = None) -> None:
        """Give ``module`` the class ``mixin + type(module)``.

        accelerate's dispatch hooks keep the original bound ``forward`` in ``_old_forward``; it is
        rebound so that the patched forward runs on dispatched models too.
        """
        module.__class__ = swapped_class(mixin, type(module))
        module._illava = ModulePatch(self.state, layer)
        if hasattr(module, "_old_forward"):
            module._old_forward = types.MethodType(module.__class__.forward, module)
        self.swapped.append(module)

    def hook(self, module: torch.nn.Module, hook: Hook, kind: str = "pre", always: bool = False) -> None:
        """Register ``hook`` on ``module``: ``pre`` (forward pre-hook) or ``post`` (forward hook),
        both with keyword arguments; ``always``: a forward hook that also runs when the forward
        raises (it ends per-call state)."""
        if kind == "pre":
            module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            module.register_forward_hook(hook, with_kwargs=True, always_call=always)
        self.hooks.append((module, hook, kind))

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


def _remove_hook(module: torch.nn.Module, hook: Hook, kind: str) -> None:
    """Remove ``hook`` from ``module`` by identity (handles do not survive ``deepcopy``)."""
    if kind == "pre":
        main, extra = module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)
    else:
        main, extra = module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)
    for key in [k for k, v in main.items() if v is hook]:
        for table in (main, *extra):
            table.pop(key, None)
