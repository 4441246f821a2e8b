"""The ``illava`` console script. The command line needs the ``tools`` extra (typer, rich and the
pictures, plots and data sets of the tools); without it, one line says how to install it instead of
a traceback. The core (``import illava``) needs none of it."""

from __future__ import annotations

import sys

# the top-level modules of the `tools` extra (pyproject.toml)
TOOLS_MODULES = ("typer", "rich", "skimage", "matplotlib", "easy_vqa", "sklearn")
HINT = 'the illava command line needs the tools extra: pip install "illava[tools]"'


def main() -> None:
    try:
        from .cli import app

        app()
    except ImportError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in TOOLS_MODULES:
            raise
        print(f"illava: {HINT} (no module named {missing!r})", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
