"""illava: iLLaVA token merging for Hugging Face transformers vision-language models.

import illava
illava.apply(model, "image")      # a preset (illava.PRESETS), a method (illava.METHODS), or an IllavaConfig
out = model.generate(**inputs)
print(illava.stats(model))
illava.remove(model)              # stock behaviour again

``illava.configure(model, name_or_config, knob, **overrides)`` is the configuration ``apply`` uses;
``IllavaConfig.from_preset`` scales a preset to given dimensions without a model.
The core (this package without ``illava.tools``) imports only torch and transformers.

The Hugging Face transformers backend (``apply``, ``configure``, ... : ``illava.api``, ``illava.hf``,
``illava.adapters``) is imported on first use, and checks the installed transformers then
(``illava._compat``); the configuration, the plan and the policies (what the vLLM plugin
``illava.vllm`` reuses) import with any transformers.
"""

from .config import PRESETS, IllavaConfig
from .methods import METHODS
from .policy import DivPrune, FastV, PDrop, Policy, Pool, RandomDrop, ToMe, VisionZip

_BACKEND = ("apply", "config_of", "configure", "is_applied", "remove", "set_enabled", "stats")
# deprecated names, reachable but not listed (``__all__``, ``dir``): ``resolve_config`` (``configure``
# before 0.2.0; it warns when called, and goes in 0.4.0)
_DEPRECATED = ("resolve_config",)


def __getattr__(name: str):
    """The transformers backend's calls, imported on first use (PEP 562): ``illava.hf`` checks the
    transformers version then, and fails with the install command that fixes it."""
    if name in _BACKEND or name in _DEPRECATED:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'illava' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_BACKEND))


__version__ = "0.2.0"
__all__ = [
    "METHODS",
    "PRESETS",
    "DivPrune",
    "FastV",
    "IllavaConfig",
    "PDrop",
    "Policy",
    "Pool",
    "RandomDrop",
    "ToMe",
    "VisionZip",
    "apply",
    "config_of",
    "configure",
    "is_applied",
    "remove",
    "set_enabled",
    "stats",
]
