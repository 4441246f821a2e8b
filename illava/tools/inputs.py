"""Inputs for any supported family without the combined processor (which needs torchvision).

Users with torchvision keep using ``AutoProcessor``; these helpers produce the same tensors from the
family's image processor (``illava.tools.families``: ``build_inputs``) and a tokenizer. Prompts contain ``<image>`` /
``<video>`` markers, expanded to the stock number of placeholder tokens as the stock processor
expands them.
"""

from __future__ import annotations

import torch

from .families import tools_for

SPECIAL_TOKENS = [
    "<pad>",
    "<image>",
    "<video>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<img>",
    "</img>",
]
_WORDS = (
    "a an the is are was what which who where how many much color shape of in on at to and or not yes no "
    "this that there it its image picture photo video frame show shows shown describe answer question "
    "user assistant system you are helpful red green blue yellow black white gray orange purple brown "
    "circle square triangle rectangle cat dog person man woman astronaut rocket coffee cup camera coins "
    "one two three four five six seven eight nine ten left right top bottom middle big small"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer(vocab_size: int = 256, padding_side: str = "left"):
    """A small word-level tokenizer (built offline) whose first ids are the special tokens:
    ``<image>`` 1, ``<video>`` 2, ``<|vision_start|>`` 6, ``<|vision_end|>`` 7, ``<img>`` 8,
    ``</img>`` 9 (the ids of the tiny configurations of ``illava.tools.families``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in _WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789?.,!:;'\"()-\n"):
        if piece not in vocab and len(vocab) < vocab_size:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:3] + SPECIAL_TOKENS[4:],
        padding_side=padding_side,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class PlaceholderTokenizer:
    """For models with any vocabulary (bundled architectures): the markers become the config's
    placeholder and delimiter ids, every other word a fixed text id. Speed does not depend on ids."""

    MARKERS = ("<image>", "<video>", "<|vision_start|>", "<|vision_end|>", "<img>", "</img>")

    def __init__(self, config, text_id: int = 100):
        ids = {
            "<image>": getattr(config, "image_token_id", None),
            "<video>": getattr(config, "video_token_id", None),
            "<|vision_start|>": getattr(config, "vision_start_token_id", None),
            "<|vision_end|>": getattr(config, "vision_end_token_id", None),
        }
        self.ids = {k: v for k, v in ids.items() if v is not None}
        self.text_id = text_id

    def __call__(self, texts, return_tensors="pt", padding=True):
        rows = []
        for text in texts:
            for marker in self.MARKERS:
                text = text.replace(marker, f" {marker} ")
            rows.append([self.ids.get(piece, self.text_id) for piece in text.split()])
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def build(config, tokenizer, prompts, images=(), videos=(), image_processor=None):
    """Stock inputs of ``config``'s family (``tools_for(config).build_inputs``)."""
    return tools_for(config).build_inputs(config, tokenizer, prompts, images, videos, image_processor)


def placeholder_inputs(config, images=(), videos=(), text_tokens: int = 32, image_processor=None):
    """One sample for a model with any vocabulary: ``text_tokens`` text ids, the stock placeholders
    of every image and video, ``text_tokens`` more."""
    prompt = "a " * text_tokens + "<image> " * len(images) + "<video> " * len(videos) + "b " * text_tokens
    return build(config, PlaceholderTokenizer(config), [prompt], images, videos, image_processor)


def for_model(inputs: dict, model) -> dict:
    """``inputs`` on ``model``'s device, their floating tensors (pixels) in its dtype."""
    first = next(model.parameters())

    def moved(v: torch.Tensor) -> torch.Tensor:
        return v.to(first.device, first.dtype if torch.is_floating_point(v) else v.dtype)

    return {k: moved(v) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}


def repeat_batch(inputs: dict, times: int) -> dict:
    """The same sample ``times`` times (every tensor concatenated along its first dimension)."""
    if times == 1:
        return dict(inputs)
    return {k: torch.cat([v] * times) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
