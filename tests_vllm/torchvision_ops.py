"""Test set-up only (never imported by the library): the registry's torchvision wheels are CUDA builds
whose C ops cannot load on the CPU torch of this CI, and ``import torchvision`` then fails while it
registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms``. Defining the two operator
schemas first lets torchvision import (its pure-torch transforms run), which vLLM's LLaVA model and
transformers' image processors need. ``setup_env.py`` puts a ``.pth`` file importing this module into
the test venv, so that vLLM's subprocesses get it at interpreter start too. A machine with a
matching torchvision needs none of this: ``define`` does nothing when torchvision's ops load."""

from __future__ import annotations


def define() -> None:
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or importlib.util.find_spec("torch") is None:
        return
    import glob
    import os

    import torch

    for library in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(library)  # what torchvision does; works where its build matches torch
            return
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    define.library = lib  # keep the definitions alive


try:
    define()
except Exception:  # noqa: BLE001 - a .pth import must never stop the interpreter
    pass
