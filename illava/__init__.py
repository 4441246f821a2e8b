"""illava: iLLaVA token merging for Hugging Face transformers vision-language models.

import illava
illava.apply(model, "image")      # or "video", or an IllavaConfig
out = model.generate(**inputs)
print(illava.stats(model))
illava.remove(model)              # stock behaviour again
"""

from ._compat import check_transformers_version

check_transformers_version()

from .api import apply, config_of, is_applied, remove, resolve_config, set_enabled, stats  # noqa: E402
from .config import PRESETS, IllavaConfig, preset  # noqa: E402
from .state import Stats  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "IllavaConfig",
    "PRESETS",
    "Stats",
    "apply",
    "config_of",
    "is_applied",
    "preset",
    "remove",
    "resolve_config",
    "set_enabled",
    "stats",
]
