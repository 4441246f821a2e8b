"""The tooling interface: what the tools (``illava.tools``) know about one model family.

The runtime side of a family is its adapter (``illava.adapters``: parts, units, layout, positions,
presets). Everything only the tools need lives here, one file per family
(``illava/tools/families/<family>.py``), reached through ``illava.tools.families.tools_for``:

1. **which model types it serves** (``config_types``, as its adapter's);
2. **bundled configurations**: published architectures (``architectures``, name -> config with the
   published dimensions) and tiny test configurations (``tiny``, name -> small config whose token
   ids match ``illava.tools.inputs.word_tokenizer``);
3. **inputs without the combined processor** (which needs torchvision): the family's image
   processor (``image_processor``) and stock inputs for prompts with ``<image>`` / ``<video>``
   markers (``build_inputs``);
4. **pictures of its units** from the pixel values a model received (``pictures``, for
   ``illava.tools.viz``);
5. **its FLOPs dimensions** (``flops_dims``, for ``illava.tools.flops``);
6. whether token counts after the encoder stage depend on the weights (``counts_depend_on_weights``:
   tools must not measure them on models of other widths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LayerDims:
    """One transformer layer for the FLOPs model (``illava.tools.flops``)."""

    d: int
    m: int
    heads: int
    kv_heads: int
    gated: bool

    @classmethod
    def of_decoder(cls, tc) -> LayerDims:
        """A gated (SwiGLU / GeGLU) decoder layer from a transformers text configuration."""
        return cls(tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads, True)

    @classmethod
    def of_vit(cls, vc) -> LayerDims:
        """A plain-MLP ViT layer (CLIP, SigLIP, InternViT) from a transformers vision configuration; a
        DINOv2 one has no ``intermediate_size``: its MLP is ``mlp_ratio`` times as wide (a SwiGLU one,
        ``use_swiglu_ffn``, gated and 2/3 of that, rounded up to 8, as transformers builds it)."""
        width = getattr(vc, "intermediate_size", None)
        if width is None and getattr(vc, "use_swiglu_ffn", False):
            width = (int(int(vc.hidden_size * vc.mlp_ratio) * 2 / 3) + 7) // 8 * 8
            return cls(vc.hidden_size, width, vc.num_attention_heads, vc.num_attention_heads, True)
        if width is None:
            width = int(vc.hidden_size * vc.mlp_ratio)
        return cls(vc.hidden_size, width, vc.num_attention_heads, vc.num_attention_heads, False)


@dataclass
class FlopsDims:
    encoder: LayerDims
    encoder_depth: int
    projector_macs_per_token: float  # per token leaving the encoder (after merges)
    text: LayerDims
    text_depth: int
    vocab: int
    window: int | None = None  # tokens a window layer attends over (Qwen2.5-VL), None: whole crop
    full_layers: tuple[int, ...] = ()  # layers attending over the whole crop when ``window`` is set
    projector_on_stock: bool = False  # the projector runs on the stock token count (removed rows included)


@dataclass
class Panel:
    """A picture the units of one item are drawn on (``illava.tools.viz``)."""

    name: str
    image: object  # (H, W, 3) float numpy array in [0, 1], H = rows * cell, W = cols * cell
    units: object  # (rows, cols) numpy array: unit (numbered over the encoder call) of every cell, -1: none
    cell: int  # pixels per cell


class FamilyTools:
    """Base of every family's tooling (module docstring)."""

    config_types: tuple[str, ...] = ()
    architectures: dict[str, Callable] = {}
    tiny: dict[str, Callable] = {}
    counts_depend_on_weights = False

    def image_processor(self, config):
        """The family's image processor (PIL backend) for ``config``."""
        raise NotImplementedError

    def build_inputs(self, config, tokenizer, prompts, images=(), videos=(), image_processor=None):
        """Stock inputs for ``prompts`` whose ``<image>`` / ``<video>`` markers are filled in order
        from PIL ``images`` and ``videos`` (lists of frames), without the combined processor
        (``image_processor``: default ``self.image_processor(config)``)."""
        raise NotImplementedError

    def pictures(self, model, inputs: dict, kind: str, call, mean_std=None) -> list[list[Panel]]:
        """Panels of every item of an encoder call, from the pixel values the model received
        (``mean_std``: the normalisation to undo, default the family's image processor's)."""
        raise NotImplementedError

    def flops_dims(self, config) -> FlopsDims:
        raise NotImplementedError


def placeholder(tokenizer, token_id: int, default: str) -> str:
    """The tokenizer's spelling of a placeholder id (``<|image_pad|>`` for Qwen's, ``<image>`` ...)."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    token = convert(token_id) if convert is not None and token_id is not None else None
    return token if isinstance(token, str) else default


def unnormalise(pixels: torch.Tensor, mean, std):
    """``(3, H, W)`` normalised pixel values -> ``(H, W, 3)`` numpy array in [0, 1]."""
    x = pixels.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def check_markers(prompts, images, videos, takes_video: bool = True, family: str = "") -> None:
    """``ValueError`` unless the ``<image>`` / ``<video>`` markers match the images / videos given."""
    if not takes_video and (videos or any("<video>" in p for p in prompts)):
        raise ValueError(f"{family} takes no video")
    if sum(p.count("<image>") for p in prompts) != len(images) or sum(p.count("<video>") for p in prompts) != len(
        videos
    ):
        raise ValueError("the number of <image>/<video> markers must match the images/videos given")
