"""illava: iLLaVA token merging for Hugging Face transformers vision-language models.

import illava
illava.apply(model, "image")      # or "video", an IllavaConfig, or a peer method ("fastv", "tome", ...)
out = model.generate(**inputs)
print(illava.stats(model))
illava.remove(model)              # stock behaviour again

The core (this package without ``illava.tools``) imports only torch and transformers.
"""

from ._compat import check_transformers_version

check_transformers_version()

from .api import apply, config_of, is_applied, preset, remove, resolve_config, set_enabled, stats  # noqa: E402
from .config import PRESETS, IllavaConfig  # noqa: E402
from .methods import METHODS, method_config  # noqa: E402
from .policy import DivPrune, FastV, InvertedScores, PDrop, Policy, Pool, RandomDrop, ToMe, VisionZip  # noqa: E402
from .state import Stats  # noqa: E402

__version__ = "0.2.0"
__all__ = [
    "METHODS",
    "DivPrune",
    "FastV",
    "IllavaConfig",
    "InvertedScores",
    "PDrop",
    "PRESETS",
    "Policy",
    "Pool",
    "RandomDrop",
    "ToMe",
    "VisionZip",
    "Stats",
    "apply",
    "config_of",
    "is_applied",
    "method_config",
    "preset",
    "remove",
    "resolve_config",
    "set_enabled",
    "stats",
]
