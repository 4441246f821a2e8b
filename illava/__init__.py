"""illava: iLLaVA token merging for Hugging Face transformers vision-language models.

import illava
illava.apply(model, "image")      # a preset (illava.PRESETS), a method (illava.METHODS), or an IllavaConfig
out = model.generate(**inputs)
print(illava.stats(model))
illava.remove(model)              # stock behaviour again

``illava.configure(model, name_or_config, knob, **overrides)`` is the configuration ``apply`` uses;
``IllavaConfig.from_preset`` scales a preset to given dimensions without a model.
The core (this package without ``illava.tools``) imports only torch and transformers.
"""

from ._compat import check_transformers_version

check_transformers_version()

from .api import apply, config_of, configure, is_applied, remove, set_enabled, stats  # noqa: E402
from .config import PRESETS, IllavaConfig  # noqa: E402
from .methods import METHODS  # noqa: E402
from .policy import DivPrune, FastV, PDrop, Policy, Pool, RandomDrop, ToMe, VisionZip  # noqa: E402

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
