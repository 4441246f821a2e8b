"""Build LLaVA-OneVision inputs without the combined processor (which needs torchvision).

Users with torchvision keep using ``AutoProcessor``; these helpers produce the same tensors from
the image processor and a tokenizer: prompts contain ``<image>`` / ``<video>`` markers, expanded
to the stock number of placeholder tokens, exactly as the stock processor expands them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerFast
from transformers.models.llava_onevision import modeling_llava_onevision as mlo
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

SPECIAL_TOKENS = [
    "<pad>",
    "<image>",
    "<video>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
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


def word_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A small word-level tokenizer (built offline) whose ids 0..5 are the special tokens.

    ``<image>`` is id 1, ``<video>`` id 2, ``<|vision_start|>`` 6 and ``<|vision_end|>`` 7, matching
    the tiny configs of ``illava.architectures``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

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
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def image_processor_for(config) -> LlavaOnevisionImageProcessorPil:
    """The PIL image processor matching a LLaVA-OneVision config (crop size and AnyRes grid)."""
    size = config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
    )


def image_token_count(config, image_size: Sequence[int], single_crop: bool = False) -> int:
    """Placeholders stock transformers uses for one image of ``(height, width)`` pixels.

    Computed by the stock ``pack_image_features`` on one-channel zeros, so it follows the
    installed transformers exactly (unpadding, newlines, ``anyres_max`` downsampling).
    """
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    crops = (
        1
        if single_crop
        else mlo.image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, vc.image_size)
    )
    stub = type("Stub", (), {"config": config})()
    _, lens = mlo.LlavaOnevisionModel.pack_image_features(
        stub,
        [torch.zeros(crops, side * side, 1)],
        torch.tensor([list(image_size)]),
        torch.zeros(1),
        config.vision_aspect_ratio,
    )
    return int(lens[0])


def video_token_count(config, frames: int) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return frames * math.ceil(side / 2) ** 2 + 1


def video_pixels(frames: Sequence[Image.Image | np.ndarray], image_processor) -> torch.Tensor:
    """``(frames, 3, H, W)`` as the LLaVA-OneVision video processor makes them: resized and normalised."""
    size = image_processor.size
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, dtype=np.float32)[:, None, None]
    out = []
    for frame in frames:
        img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
        img = img.convert("RGB").resize((size["width"], size["height"]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append((arr - mean) / std)
    return torch.from_numpy(np.stack(out))


def build_inputs(
    config,
    tokenizer,
    image_processor,
    prompts: Sequence[str],
    images: Sequence[Image.Image] = (),
    videos: Sequence[Sequence[Image.Image | np.ndarray]] = (),
) -> BatchFeature:
    """Tokenised, left-padded batch for ``prompts`` whose ``<image>``/``<video>`` markers are
    filled in order from ``images`` / ``videos`` (one list of frames per video)."""
    per_sample = [p.count("<image>") for p in prompts]
    if sum(per_sample) != len(images) or sum(p.count("<video>") for p in prompts) != len(videos):
        raise ValueError("the number of <image>/<video> markers must match the images/videos given")
    data = {}
    texts = list(prompts)
    if images:
        pix = image_processor(list(images), return_tensors="pt")
        data["pixel_values"], data["image_sizes"] = pix["pixel_values"], pix["image_sizes"]
        data["batch_num_images"] = torch.tensor([n for n in per_sample if n > 0])
        sizes = iter(pix["image_sizes"].tolist())
        texts = []
        for prompt, n in zip(prompts, per_sample):
            for _ in range(n):
                count = image_token_count(config, next(sizes), single_crop=n > 1)
                prompt = prompt.replace("<image>", "\0" * count, 1)
            texts.append(prompt.replace("\0", "<image>"))
    if videos:
        lengths = {len(v) for v in videos}
        if len(lengths) != 1:
            raise ValueError("all videos of a batch need the same number of frames")
        data["pixel_values_videos"] = torch.stack([video_pixels(v, image_processor) for v in videos])
        count = video_token_count(config, lengths.pop())
        texts = [t.replace("<video>", "<video>" * count) for t in texts]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    data.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return BatchFeature(data)


def placeholder_inputs(
    config,
    image_processor,
    images: Sequence[Image.Image] = (),
    videos: Sequence[Sequence[Image.Image | np.ndarray]] = (),
    text_tokens: int = 32,
    seed: int = 0,
) -> BatchFeature:
    """One sample for a model with any vocabulary (no tokenizer): ``text_tokens`` random text ids,
    then the stock placeholders of every image and video, then ``text_tokens`` more."""
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    special = torch.tensor([config.image_token_id, config.video_token_id])

    def text():
        ids = torch.randint(10, vocab, (text_tokens,), generator=generator)
        return torch.where(torch.isin(ids, special), 10, ids)  # never a placeholder

    pieces, data = [text()], {}
    if images:
        pix = image_processor(list(images), return_tensors="pt")
        data.update(pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"])
        data["batch_num_images"] = torch.tensor([len(images)])
        for size in pix["image_sizes"].tolist():
            pieces.append(
                torch.full((image_token_count(config, size, single_crop=len(images) > 1),), config.image_token_id)
            )
    if videos:
        data["pixel_values_videos"] = torch.stack([video_pixels(v, image_processor) for v in videos])
        for v in videos:
            pieces.append(torch.full((video_token_count(config, len(v)),), config.video_token_id))
    pieces.append(text())
    ids = torch.cat(pieces)[None]
    data.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    return BatchFeature(data)


# ------------------------------------------------------------------------------------- Qwen-VL
def qwen_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
    """The PIL Qwen2-VL image processor (also Qwen2.5-VL's) with a pixel budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def qwen_video_pixels(frames: Sequence[Image.Image | np.ndarray], image_processor) -> tuple[torch.Tensor, list[int]]:
    """``pixel_values_videos`` and ``[t, h, w]`` as the Qwen2-VL video processor makes them: frames
    resized like images, consecutive frame pairs packed into the temporal patch of 2."""
    frames = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in frames]
    if len(frames) % 2:
        frames = frames + frames[-1:]
    out = image_processor(frames, return_tensors="pt")
    grid = out["image_grid_thw"][0].tolist()
    per_frame = out["pixel_values"].view(len(frames), grid[1] * grid[2], 3, 2, -1)[:, :, :, 0]  # drop the copy
    pairs = per_frame.view(len(frames) // 2, 2, *per_frame.shape[1:]).permute(0, 2, 3, 1, 4)
    return pairs.reshape(-1, 3 * 2 * per_frame.shape[-1]), [len(frames) // 2, grid[1], grid[2]]


def build_qwen_inputs(
    config,
    tokenizer,
    image_processor,
    prompts: Sequence[str],
    images: Sequence[Image.Image] = (),
    videos: Sequence[Sequence[Image.Image | np.ndarray]] = (),
    image_token: str = "<image>",
    video_token: str = "<video>",
) -> BatchFeature:
    """Qwen2-VL / Qwen2.5-VL batch: ``<image>``/``<video>`` markers become
    ``<|vision_start|>`` + stock placeholders + ``<|vision_end|>``; ``mm_token_type_ids`` as the
    stock processor returns them. ``image_token``/``video_token``: the placeholder tokens of the
    tokenizer (``<|image_pad|>``/``<|video_pad|>`` for the released Qwen-VL tokenizers)."""
    merge = config.vision_config.spatial_merge_size**2
    data, texts = {}, list(prompts)
    if sum(p.count("<image>") for p in prompts) != len(images) or sum(p.count("<video>") for p in prompts) != len(
        videos
    ):
        raise ValueError("the number of <image>/<video> markers must match the images/videos given")
    if images:
        pix = image_processor(list(images), return_tensors="pt")
        data.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
        counts = iter((pix["image_grid_thw"].prod(-1) // merge).tolist())
        texts = [_expand(t, "<image>", counts, image_token) for t in texts]
    if videos:
        packed = [qwen_video_pixels(v, image_processor) for v in videos]
        data["pixel_values_videos"] = torch.cat([p for p, _ in packed])
        data["video_grid_thw"] = torch.tensor([g for _, g in packed])
        counts = iter((data["video_grid_thw"].prod(-1) // merge).tolist())
        texts = [_expand(t, "<video>", counts, video_token) for t in texts]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    types = torch.zeros_like(ids)
    types[ids == config.image_token_id] = 1
    types[ids == config.video_token_id] = 2
    data.update(input_ids=ids, attention_mask=enc["attention_mask"], mm_token_type_ids=types)
    return BatchFeature(data)


def _expand(text: str, marker: str, counts, token: str) -> str:
    parts = text.split(marker)
    out = parts[0]
    for part in parts[1:]:
        out += "<|vision_start|>" + "\0" * next(counts) + "<|vision_end|>" + part
    return out.replace("\0", token)


def qwen_placeholder_inputs(config, image_processor, images=(), videos=(), text_tokens: int = 32) -> BatchFeature:
    """One Qwen-VL sample for a model with any vocabulary (no tokenizer): text ids around the
    ``<|vision_start|>`` + stock placeholders + ``<|vision_end|>`` of every image and video."""
    specials = {
        "<image>": config.image_token_id,
        "<video>": config.video_token_id,
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
    }

    def tokenize(texts, return_tensors, padding):
        rows = []
        for text in texts:
            for name in specials:
                text = text.replace(name, f" {name} ")
            rows.append([specials.get(piece, 100) for piece in text.split()])
        ids = torch.tensor(rows)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    prompt = "a " * text_tokens + " <image>" * len(images) + " <video>" * len(videos) + " b" * text_tokens
    return build_qwen_inputs(config, tokenize, image_processor, [prompt], images, videos)


def repeat_batch(inputs: dict, times: int) -> dict:
    """The same sample ``times`` times (every tensor concatenated along its first dimension)."""
    if times == 1:
        return dict(inputs)
    return {k: torch.cat([v] * times) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
