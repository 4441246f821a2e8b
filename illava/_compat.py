"""The transformers versions illava is tested with; anything else fails with a clear message."""

from importlib.metadata import version

from packaging.version import Version

TRANSFORMERS_MIN = "5.24.0"
TRANSFORMERS_MAX = "5.40.0"  # exclusive: 5.40 removes the ``past_key_values`` spelling we still accept


def check_transformers_version(installed: str | None = None) -> None:
    installed = installed or version("transformers")
    if not Version(TRANSFORMERS_MIN) <= Version(installed) < Version(TRANSFORMERS_MAX):
        raise ImportError(
            f"illava supports transformers >={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX}; found {installed}. "
            f'Install a supported version: pip install "transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX}"'
        )
