"""``illava serve``: a local web page that runs stock and iLLaVA side by side on one input.

Two layers. The functions above the UI section compute everything and know nothing of Gradio:
``load_model`` (the shipped easy-VQA model, or a supported local folder / hub id), ``read_media``
(an uploaded image or video file, or a readable ``MediaError``), ``fields_for`` /
``config_from_fields`` (the preset + sliders of the page, which round-trip to the preset's
configuration), ``config_for`` (a preset with the page's fields, or a method at its published
default or solved for a share of stock prefill FLOPs) and ``compare`` (both answers, the prefill
times measured by one helper in alternation, the visual tokens per stage, the analytic prefill
FLOPs and the ``illava viz`` pictures). ``build_app`` wires them into a Gradio page and ``launch``
starts it, on 127.0.0.1 unless told otherwise.

Gradio is imported only inside ``build_app`` / ``launch``: ``import illava.tools.serve`` works
without it.
"""

from __future__ import annotations

import ipaddress
import os
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .. import api
from ..config import PRESETS, RECYCLE_MODES, IllavaConfig
from ..methods import METHODS, REGISTRY

SHIPPED = "easy-vqa (shipped)"  # the 1.1 M-parameter LLaVA-OneVision trained on easy-VQA
REAL = "real-weights LLaVA (shipped)"  # DINOv2-S + SmolLM2-135M (illava_tasks.real): the default, as `illava`'s
BUILT_IN = (REAL, SHIPPED)
DEFAULT_QUESTION = "what is the red shape?"
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v", ".mpg", ".mpeg", ".gif"}
MAX_FRAMES = 64
MAX_UPLOAD = "200mb"


class MediaError(ValueError):
    """An upload that is not a readable image or video (the message is meant for the page)."""


class ModelError(ValueError):
    """A model that cannot be loaded or is not supported (the message is meant for the page)."""


# ------------------------------------------------------------------------------------ models
@dataclass
class LoadedModel:
    """A model with what builds its inputs: its combined processor when it has one with a chat
    template (needs torchvision), else its tokenizer and image processor with a chatml prompt."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    image_processor: object = None
    processor: object = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # apply/remove mutate the model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prompt(self, question: str, kind: str) -> str:
        """One user turn with one image or one video, then the assistant's turn."""
        if self.processor is not None:
            messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        # chatml with the builders' markers: the shipped model's own format (easy_vqa.prompt)
        return f"<|im_start|>user\n<{kind}>\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def inputs(self, question: str, media: Media) -> dict:
        """Stock model inputs for ``question`` about ``media``, on the model's device and dtype."""
        from .inputs import build

        prompt = self.prompt(question, media.kind)
        images = [media.frames[0]] if media.kind == "image" else []
        videos = [media.frames] if media.kind == "video" else []
        if self.processor is not None:
            batch = self.processor(
                text=[prompt], images=images or None, videos=videos or None, return_tensors="pt", padding=True
            )
        else:
            batch = build(self.model.config, self.tokenizer, [prompt], images, videos, self.image_processor)
        out = {}
        for key, value in dict(batch).items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                out[key] = value.to(self.dtype) if key.startswith("pixel_values") else value
        return out


_MODELS: dict[tuple[str, str], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def load_model(name: str | None = None, device: str = "cpu") -> LoadedModel:
    """A shipped model (``REAL``, the default, or ``SHIPPED``), or a supported model from a local
    folder or hub id (cached: the shipped models and the last other one stay loaded). Failures raise
    ``ModelError`` with one readable line."""
    name = (name or "").strip() or REAL
    key = (name, str(device))
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        loaded = _load(name, device)
        for other in [k for k in _MODELS if k[0] not in BUILT_IN]:
            del _MODELS[other]
        _MODELS[key] = loaded
        return loaded


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _load(name: str, device: str) -> LoadedModel:
    from ..adapters import adapter_for

    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise ModelError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from error
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda asked for, but torch sees no CUDA device")
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    if name in BUILT_IN:
        from illava_tasks import easy_vqa, real

        from .demo import default_dtype

        try:
            model, tokenizer, image_processor = (real if name == REAL else easy_vqa).load()
        except FileNotFoundError as error:
            raise ModelError(str(error)) from error
        # as `illava`'s demo: the real-weights model in bfloat16 where the machine runs it natively
        dtype = (torch.bfloat16 if target.type == "cuda" else default_dtype()) if name == REAL else torch.float32
        return LoadedModel(name, model.to(target, dtype), tokenizer, image_processor)
    if not Path(name).exists() and name.count("/") != 1:
        raise ModelError(f"model {name!r} is neither a folder nor a hub id (owner/name)")
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(target).eval()
        adapter_for(model)  # a TypeError naming the supported classes
    except (TypeError, ValueError, OSError, KeyError, ImportError) as error:
        raise ModelError(f"cannot use model {name}: {_first_line(error)}") from error
    try:
        processor = AutoProcessor.from_pretrained(name)
        if getattr(processor, "chat_template", None) is None or not hasattr(processor, "image_processor"):
            raise ValueError("no chat template")
        return LoadedModel(name, model, processor.tokenizer, processor.image_processor, processor)
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        pass  # no torchvision (combined processors need it) or no chat template
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (ImportError, OSError, ValueError, TypeError, KeyError) as error:
        raise ModelError(f"cannot load the tokenizer / image processor of {name}: {_first_line(error)}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name, model, tokenizer, image_processor)


def describe(loaded: LoadedModel) -> str:
    """One line about the model: class, parameters, device."""
    params = sum(p.numel() for p in loaded.model.parameters())
    size = f"{params / 1e6:.1f} M" if params < 1e9 else f"{params / 1e9:.2f} B"
    note = {
        SHIPPED: " (LLaVA-OneVision architecture trained on easy-VQA on a CPU)",
        REAL: " (DINOv2-S/14 + SmolLM2-135M from their PyPI packages, projector and LoRA trained on easy-VQA)",
    }.get(loaded.name, "")
    return f"{loaded.name}: {type(loaded.model).__name__}, {size} parameters{note}, {loaded.device}, {loaded.dtype}"


# ------------------------------------------------------------------------------------ media
@dataclass
class Media:
    kind: str  # "image" or "video"
    frames: list[Image.Image]  # one for an image; the sampled frames of a video
    name: str = ""
    total_frames: int = 1  # frames in the file (videos)

    def describe(self) -> str:
        w, h = self.frames[0].size
        if self.kind == "image":
            return f"image {self.name}, {w}x{h}"
        return f"video {self.name}, {self.total_frames} frames, {len(self.frames)} used, {w}x{h}"

    def preview(self, height: int = 160) -> Image.Image:
        """The image, or the frames used side by side."""
        thumbs = []
        for frame in self.frames[:MAX_FRAMES]:
            scale = height / frame.height
            thumbs.append(frame.resize((max(1, round(frame.width * scale)), height), Image.NEAREST))
        if len(thumbs) == 1:
            return thumbs[0]
        gap = 4
        strip = Image.new("RGB", (sum(t.width for t in thumbs) + gap * (len(thumbs) - 1), height), (255, 255, 255))
        x = 0
        for thumb in thumbs:
            strip.paste(thumb, (x, 0))
            x += thumb.width + gap
        return strip


def _sample(count: int, frames: int) -> list[int]:
    """``frames`` indices spread evenly over ``count`` (all of them if there are fewer)."""
    if count <= frames:
        return list(range(count))
    return [round(i * (count - 1) / (frames - 1)) for i in range(frames)] if frames > 1 else [0]


def read_media(path: str | Path | None, frames: int = 8) -> Media:
    """An uploaded file as an image or as the ``frames`` evenly spread frames of a video (animated
    GIF / WebP with PIL, other containers with PyAV). Anything else raises ``MediaError`` with a
    message for the page: no file, an empty file, not an image or video, a corrupt one."""
    if path is None or str(path) == "":
        raise MediaError("no image or video: upload one or pick a bundled example")
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise MediaError(f"{name}: the uploaded file is gone; upload it again")
    if path.stat().st_size == 0:
        raise MediaError(f"{name} is empty (0 bytes): upload an image (PNG, JPEG, ...) or a video (MP4, GIF, ...)")
    if not 1 <= frames <= MAX_FRAMES:
        raise MediaError(f"frames must be between 1 and {MAX_FRAMES}, got {frames}")
    suffix = path.suffix.lower()
    pil_error = None
    try:
        with Image.open(path) as image:
            count = getattr(image, "n_frames", 1)
            if count > 1:
                picked = set(_sample(count, frames))
                out = []
                for i in range(count):
                    image.seek(i)
                    if i in picked:
                        out.append(image.convert("RGB"))
                return Media("video", out, name, count)
            image.load()
            return Media("image", [image.convert("RGB")], name)
    except Image.DecompressionBombError as error:
        raise MediaError(f"{name} is too large to process safely ({_why(error, path)})") from error
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad upload, said in one line
        pil_error = error
    if suffix in VIDEO_SUFFIXES or suffix not in {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}:
        try:
            return _read_video(path, frames)
        except MediaError:
            raise
        except Exception as error:  # noqa: BLE001
            if suffix in VIDEO_SUFFIXES:
                raise MediaError(f"{name} cannot be read as a video: {_why(error, path)}") from error
    raise MediaError(
        f"{name} is not an image or a video that can be read ({_why(pil_error, path)}); "
        "upload a PNG, JPEG, WebP, GIF, MP4 or WebM file"
    )


def _why(error: BaseException, path: Path) -> str:
    """The first line of ``error`` with the server's path of the upload replaced by its name."""
    return _first_line(error).replace(str(path), path.name)


def _read_video(path: Path, frames: int) -> Media:
    try:
        import av
    except ImportError as error:
        raise MediaError(f"{path.name}: reading videos needs PyAV (pip install av)") from error
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(f"{path.name} has no video stream")
        stream = container.streams.video[0]
        decoded = []
        for frame in container.decode(stream):
            decoded.append(frame)
            if len(decoded) >= 20 * MAX_FRAMES * 4:  # long clips: sample from the first frames decoded
                break
        if not decoded:
            raise MediaError(f"{path.name}: no frame could be decoded")
        picked = [decoded[i].to_image().convert("RGB") for i in _sample(len(decoded), frames)]
    return Media("video", picked, path.name, len(decoded))


# ------------------------------------------------------------------------------------ configuration
@dataclass
class Fields:
    """The page's preset fields: the configuration a preset sets, as the page shows it."""

    encoder_layers: str  # "1,2,3,4"
    encoder_removal: float  # per layer: a count (``removal_kind`` "count") or a fraction
    llm_layers: str
    llm_keep_ratio: float
    recycle: str
    removal_kind: str = "count"  # "count" or "fraction"
    removal_max: float = 0.0
    removal_step: float = 1.0


def _one(value, name: str):
    if isinstance(value, tuple):
        if len(set(value)) > 1:
            raise ValueError(f"{name} differs per layer ({value}); the page sets one value for every layer")
        return value[0] if value else None
    return value


def _count_kind(model, preset: str) -> bool:
    """Whether the preset's encoder removal is a count (else a fraction)."""
    base = api.configure(model, "image" if preset in ("off", "llm-only") else preset)
    return isinstance(_one(base.encoder_removal, "encoder_removal"), int)


def fields_for(model, preset: str) -> Fields:
    """The fields of ``preset`` scaled to ``model`` (``config_from_fields`` gives the preset back)."""
    from ..adapters import adapter_for

    config = api.configure(model, preset)
    dims = adapter_for(model).dimensions(model)
    removal = _one(config.encoder_removal, "encoder_removal") or 0
    keep = _one(config.llm_keep_ratio, "llm_keep_ratio")
    if _count_kind(model, preset):
        layers = max(1, len(config.encoder_layers) or 4)
        top = max(dims.unit, (dims.tokens_per_crop // layers) // dims.unit * dims.unit) if dims.tokens_per_crop else 0
        return Fields(
            ",".join(map(str, config.encoder_layers)),
            int(removal),
            ",".join(map(str, config.llm_layers)),
            float(keep if keep is not None else 1.0),
            config.recycle,
            "count",
            float(top),
            float(dims.unit),
        )
    return Fields(
        ",".join(map(str, config.encoder_layers)),
        float(removal),
        ",".join(map(str, config.llm_layers)),
        float(keep if keep is not None else 1.0),
        config.recycle,
        "fraction",
        0.9,
        0.01,
    )


def _layers(text: str | None, name: str) -> tuple[int, ...]:
    text = (text or "").strip()
    try:
        return tuple(int(v) for v in text.replace(" ", ",").split(",") if v.strip())
    except ValueError as error:
        raise ValueError(f"{name} takes layer numbers separated by commas (e.g. 1,2,3,4), got {text!r}") from error


def config_from_fields(
    model,
    preset: str,
    encoder_layers: str,
    encoder_removal: float,
    llm_layers: str,
    llm_keep_ratio: float,
    recycle: str,
) -> IllavaConfig:
    """The configuration of the page: ``preset`` with every field set (checked against ``model``;
    a ``ValueError`` names the field and its allowed range)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if recycle not in RECYCLE_MODES:
        raise ValueError(f"recycle must be one of {', '.join(RECYCLE_MODES)}, got {recycle!r}")
    removal = float(encoder_removal or 0)
    if _count_kind(model, preset):
        if abs(removal - round(removal)) > 1e-9:
            raise ValueError(f"encoder removal is a token count for this model, got {removal:g}")
        removal = int(round(removal))
    elif not 0 <= removal < 1:
        raise ValueError(f"encoder removal is a fraction in [0, 1) for this model, got {removal:g}")
    return api.configure(
        model,
        preset,
        encoder_layers=_layers(encoder_layers, "encoder layers"),
        encoder_removal=removal,
        llm_layers=_layers(llm_layers, "LLM layers"),
        llm_keep_ratio=float(llm_keep_ratio),
        recycle=recycle,
    )


@dataclass
class Choice:
    """What the iLLaVA side runs: a preset with the page's fields, or a method (published default,
    or solved for ``budget``, a share of stock prefill FLOPs)."""

    mode: str = "preset"  # "preset" or "method"
    preset: str = "image"
    fields: dict | None = None  # config_from_fields keywords; None: the preset as it is
    method: str = "illava"
    budget: float | None = None

    def label(self) -> str:
        if self.mode == "method":
            target = "published default" if self.budget is None else f"{100 * self.budget:g}% FLOPs budget"
            return f"{self.method} ({target})"
        return f"iLLaVA ({self.preset})"


def config_for(model, choice: Choice, inputs: dict) -> tuple[IllavaConfig, dict]:
    """(configuration, notes): notes hold the solved knob and whether the budget was reached."""
    if choice.mode == "method":
        if choice.method not in METHODS:
            raise ValueError(f"unknown method {choice.method!r}; choose one of {', '.join(METHODS)}")
        if choice.budget is None:
            return REGISTRY[choice.method].config(model), {"method": choice.method, "budget": None}
        if not 0 < choice.budget <= 1:
            raise ValueError(f"the FLOPs budget is a share of stock prefill FLOPs in (0, 1], got {choice.budget}")
        from .budget import solve

        solved = solve(model, choice.method, choice.budget, inputs)
        notes = {
            "method": choice.method,
            "budget": choice.budget,
            "knob": solved.knob,
            "knob_name": REGISTRY[choice.method].knob,
            "budget_reached": solved.reached,
            "solved_share": solved.share,
        }
        return solved.config, notes
    if choice.mode != "preset":
        raise ValueError(f"mode must be 'preset' or 'method', got {choice.mode!r}")
    if choice.fields is None:
        return api.configure(model, choice.preset), {}
    return config_from_fields(model, choice.preset, **choice.fields), {}


# ------------------------------------------------------------------------------------ comparison
@dataclass
class Side:
    answer: str
    prefill_ms: float  # median of the alternated timed prefills
    visual_tokens: dict  # stock, after_encoder, after_llm
    gflops: dict  # encoder, projector, llm, lm_head, total
    stats: str

    def as_dict(self) -> dict:
        return vars(self).copy()


@dataclass
class Comparison:
    model: str
    question: str
    kind: str
    media: str
    label: str
    config: str
    stock: Side
    illava: Side
    repeats: int
    notes: dict = field(default_factory=dict)
    pictures: dict[str, Image.Image] = field(default_factory=dict)
    pictures_note: str = ""
    compact: list[str] = field(default_factory=list)  # the stages of the overview picture

    def overview(self, width: int = 720) -> Image.Image | None:
        """The input, the first scores, the last encoder layer and the LLM layers with their names
        (the stages of ``illava viz --compact``), two per row."""
        names = [n for n in self.compact if n in self.pictures] or list(self.pictures)[:1]
        return stacked([(n, self.pictures[n]) for n in names], width) if names else None

    @property
    def flops_share(self) -> float:
        return self.illava.gflops["total"] / self.stock.gflops["total"]

    @property
    def speedup(self) -> float:
        return self.stock.prefill_ms / self.illava.prefill_ms

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "question": self.question,
            "kind": self.kind,
            "media": self.media,
            "label": self.label,
            "config": self.config,
            "stock": self.stock.as_dict(),
            "illava": self.illava.as_dict(),
            "flops_share": self.flops_share,
            "prefill_speedup": self.speedup,
            "repeats": self.repeats,
            "threads": torch.get_num_threads(),
            "notes": self.notes,
            "pictures": list(self.pictures),
            "overview": [n for n in self.compact if n in self.pictures],
            "pictures_note": self.pictures_note,
        }

    def markdown(self) -> str:
        """The result table of the page."""

        def tokens(side: Side) -> str:
            v = side.visual_tokens
            return f"{v['stock']} → {v['after_encoder']} → {v['after_llm']}"

        def cell(text: str) -> str:
            return (text or "(empty)").replace("|", "\\|").replace("\n", " ")

        rows = [
            "| | answer | prefill | visual tokens (in → encoder → LLM) | GFLOPs |",
            "|---|---|---|---|---|",
            f"| **stock** | {cell(self.stock.answer)} | {self.stock.prefill_ms:.2f} ms | {tokens(self.stock)} | "
            f"{self.stock.gflops['total']:.4g} |",
            f"| **{self.label}** | {cell(self.illava.answer)} | {self.illava.prefill_ms:.2f} ms | "
            f"{tokens(self.illava)} | {self.illava.gflops['total']:.4g} |",
        ]
        same = "the same answer" if self.stock.answer == self.illava.answer else "**a different answer**"
        lines = [
            "\n".join(rows),
            "",
            f"**{100 * self.flops_share:.1f}% of stock prefill FLOPs** ({1 / self.flops_share:.2f}x cut); measured "
            f"prefill speedup **{self.speedup:.2f}x** (median of {self.repeats} alternated prefills each, "
            f"{self.stock.prefill_ms:.2f} → {self.illava.prefill_ms:.2f} ms, {torch.get_num_threads()} CPU threads); "
            f"{same}.",
        ]
        if "budget_reached" in self.notes:
            n = self.notes
            reach = (
                "" if n["budget_reached"] else " — the budget is out of reach: the method at its most reducing setting"
            )
            lines.append(
                f"\n{n['method']}: knob {n['knob_name']} = {n['knob']:.4g} gives {100 * n['solved_share']:.1f}% of "
                f"stock prefill FLOPs for a budget of {100 * n['budget']:g}%{reach}."
            )
        lines.append(f"\n`{self.config}`")
        lines.append("\n```text\n" + self.illava.stats + "\n```")
        if self.pictures_note:
            lines.append(f"\n{self.pictures_note}")
        return "\n".join(lines)


def stacked(pictures: list[tuple[str, Image.Image]], width: int = 720, columns: int = 2) -> Image.Image:
    """``pictures`` on a grid of ``columns``, each under its name, scaled up by one whole factor
    (cells stay sharp) so that a row is at most ``width`` pixels wide (or its own size if wider)."""
    from PIL import ImageDraw, ImageFont

    cell_w = max(image.width for _, image in pictures)
    columns = max(1, min(columns, len(pictures), width // cell_w))  # wide pictures (video strips): one per row
    gap, label = 12, 22
    factor = max(1, (width - gap * (columns - 1)) // (columns * cell_w))
    rows = [pictures[i : i + columns] for i in range(0, len(pictures), columns)]
    heights = [label + max(image.height for _, image in row) * factor for row in rows]
    canvas = Image.new(
        "RGB", (columns * cell_w * factor + gap * (columns - 1), sum(heights) + gap * (len(rows) - 1)), "white"
    )
    try:
        font = ImageFont.load_default(size=15)
    except (TypeError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(canvas)
    y = 0
    for row, height in zip(rows, heights):
        for c, (name, image) in enumerate(row):
            x = c * (cell_w * factor + gap)
            draw.text((x + 2, y + 3), name, fill=(20, 20, 20), font=font)
            scaled = image.convert("RGB").resize((image.width * factor, image.height * factor), Image.NEAREST)
            canvas.paste(scaled, (x, y + label))
        y += height + gap
    return canvas


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_times(model, inputs: dict, repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of one prefill (``logits_to_keep=1``, with cache) of the patched ``model`` disabled
    (exactly stock) and enabled, alternated: ``{"stock": [...], "illava": [...]}``."""
    device = next(model.parameters()).device
    times: dict[str, list[float]] = {"stock": [], "illava": []}
    try:
        with torch.inference_mode():
            for repeat in range(warmup + repeats):
                for name in times:
                    api.set_enabled(model, name == "illava")
                    _sync(device)
                    start = time.perf_counter()
                    model(**inputs, use_cache=True, logits_to_keep=1)
                    _sync(device)
                    if repeat >= warmup:
                        times[name].append(time.perf_counter() - start)
    finally:
        api.set_enabled(model, True)
    return times


def _answer(loaded: LoadedModel, inputs: dict, new_tokens: int) -> str:
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _counts(model, inputs: dict) -> tuple[dict, dict, str]:
    """Visual tokens, prefill GFLOPs and the statistics text of the last prefill."""
    from .flops import prefill_flops

    stats = api.stats(model)
    sequence = int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else inputs["input_ids"].shape[1]
    return stats.visual_tokens(), prefill_flops(model, stats, sequence), str(stats)


def compare(
    loaded: LoadedModel,
    media: Media,
    question: str,
    choice: Choice | None = None,
    *,
    new_tokens: int = 8,
    repeats: int = 5,
    pictures: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> Comparison:
    """Stock vs the chosen configuration on one input (see the module docstring)."""
    from .viz import visualize

    choice = choice or Choice()
    question = (question or "").strip()
    if not question:
        raise ValueError("ask a question about the image or video")
    if not 1 <= repeats <= 100 or not 1 <= new_tokens <= 512:
        raise ValueError("timed prefills must be 1..100 and new tokens 1..512")

    def step(fraction: float, text: str) -> None:
        if progress:
            progress(fraction, text)

    model = loaded.model
    with loaded.lock:
        try:
            step(0.05, "building the inputs")
            inputs = loaded.inputs(question, media)
            step(0.1, "solving the FLOPs budget" if choice.mode == "method" and choice.budget else "configuring")
            config, notes = config_for(model, choice, inputs)
            step(0.3, "stock: answer")
            api.remove(model)
            stock_answer = _answer(loaded, inputs, new_tokens)
            api.apply(model, IllavaConfig())  # no stage: stock compute, counted (statistics need a patch)
            with torch.inference_mode():
                model(**inputs, use_cache=True, logits_to_keep=1)
            stock_counts = _counts(model, inputs)
            step(0.45, f"{choice.label()}: answer")
            api.apply(model, config)
            illava_answer = _answer(loaded, inputs, new_tokens)
            illava_counts = _counts(model, inputs)
            images, compact, note = {}, [], ""
            if pictures:
                step(0.6, "drawing what was merged (illava viz)")
                try:
                    drawn = visualize(model, inputs)
                    images, compact = drawn.images, drawn.compact_stages()
                except Exception as error:  # noqa: BLE001 - the comparison stands without the pictures
                    note = f"no merge pictures for this configuration: {_first_line(error)}"
                if images and set(images) == {"input"}:
                    note = (
                        "this configuration reduces tokens after the encoder (feature stage): "
                        "the pictures show the input only"
                    )
            step(0.75, f"timing {repeats} alternated prefills of each")
            api.apply(model, config)
            times = prefill_times(model, inputs, repeats)
        finally:
            api.remove(model)
    median = {name: 1000 * statistics.median(values) for name, values in times.items()}
    stock = Side(stock_answer, median["stock"], *stock_counts)
    illava = Side(illava_answer, median["illava"], *illava_counts)
    step(1.0, "done")
    return Comparison(
        loaded.name,
        question,
        media.kind,
        media.describe(),
        choice.label(),
        str(config),
        stock,
        illava,
        repeats,
        notes,
        images,
        note,
        compact,
    )


# ------------------------------------------------------------------------------------ examples
EXAMPLES = (  # easy-VQA test images (64x64) with a test question whose answer names what they show
    (0, "what is the red shape?", "red triangle"),
    (11, "what is the color of the rectangle?", "yellow rectangle"),
    (18, "what is the blue shape?", "blue triangle"),
    (27, "what color is the circle?", "yellow circle"),
)
VIDEO_EXAMPLE = ("what color is the circle?", "video: a yellow circle drifting (8 frames)")


def examples_dir() -> Path:
    """A folder with the bundled examples (easy-VQA test images and a short GIF made from one),
    written once into the temp folder."""
    import easy_vqa as data

    user = getattr(os, "getuid", lambda: "")()
    folder = Path(tempfile.gettempdir()) / f"illava-serve-examples-{user}"
    folder.mkdir(parents=True, exist_ok=True)
    _, _, image_ids = data.get_test_questions()
    paths = data.get_test_image_paths()
    for index, _, _ in EXAMPLES:
        target = folder / f"easy-vqa-test-{image_ids[index]}.png"
        if not target.exists():
            _atomic_save(Image.open(paths[image_ids[index]]).convert("RGB"), target)
    video = folder / "easy-vqa-drift.gif"
    if not video.exists():
        base = Image.open(paths[image_ids[27]]).convert("RGB")
        frames = [_shift(base, 2 * i - 7, i - 4) for i in range(8)]
        tmp = folder / f".{os.getpid()}-{threading.get_ident()}.gif"
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=150, loop=0)
        tmp.replace(video)
    return folder


def _shift(image: Image.Image, dx: int, dy: int) -> Image.Image:
    canvas = Image.new("RGB", image.size, image.getpixel((0, 0)))
    canvas.paste(image, (dx, dy))
    return canvas


def _atomic_save(image: Image.Image, target: Path) -> None:
    tmp = target.with_name(f".{os.getpid()}-{threading.get_ident()}-{target.name}")
    image.save(tmp)
    tmp.replace(target)


def example_rows() -> list[tuple[str, str, str]]:
    """(file, question, label) of every bundled example."""
    import easy_vqa as data

    folder = examples_dir()
    _, _, image_ids = data.get_test_questions()
    rows = [(str(folder / f"easy-vqa-test-{image_ids[i]}.png"), q, label) for i, q, label in EXAMPLES]
    rows.append((str(folder / "easy-vqa-drift.gif"), *VIDEO_EXAMPLE))
    return rows


# ------------------------------------------------------------------------------------ security
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_warnings(host: str, share: bool) -> list[str]:
    """What to tell the user before serving on ``host`` (and a public link if ``share``)."""
    out = []
    if not is_loopback(host):
        out.append(
            f"serving on {host}, not on 127.0.0.1: anyone who can reach this machine on the network can use the "
            "page, run models on it and upload files to it"
        )
    if share:
        out.append(
            "--share creates a public gradio.live link through Gradio's relay: anyone with the link can use the "
            "page and run models on this machine until you stop the server"
        )
    return out


# ------------------------------------------------------------------------------------ the page
MODES = ("preset + sliders", "method + FLOPs budget")


def _pictures_for_gallery(comparison: Comparison) -> list[tuple[Image.Image, str]]:
    return [(image, name) for name, image in comparison.pictures.items()]


def build_app(default_model: str | None = None, device: str = "cpu"):
    """The Gradio Blocks of the page (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    default = load_model(default_model, device)
    fields = fields_for(default.model, "image")
    rows = example_rows()

    def page_error(error: BaseException) -> gr.Error:
        return gr.Error(_first_line(error), print_exception=False)

    def on_model(name: str, preset: str):
        try:
            loaded = load_model(name, device)
            f = fields_for(loaded.model, preset)
        except (ModelError, ValueError) as error:
            raise page_error(error) from None
        return (*_field_updates(gr, f), describe(loaded))

    def on_preset(name: str, preset: str):
        try:
            f = fields_for(load_model(name, device).model, preset)
        except (ModelError, ValueError) as error:
            raise page_error(error) from None
        return _field_updates(gr, f)

    def on_media(path, frames, preset):
        """Preview and a line about the upload; the preset follows the kind (image / video)."""
        if not path:
            return None, "", preset
        try:
            media = read_media(path, int(frames))
        except MediaError as error:
            return None, f"⚠️ {error}", preset
        if preset in ("image", "video"):
            preset = media.kind
        return media.preview(), media.describe(), preset

    def on_mode(mode: str):
        return gr.update(visible=mode == MODES[0]), gr.update(visible=mode == MODES[1])

    def run(
        name, path, question, mode, preset, enc_layers, enc_removal, llm_layers, keep, recycle, method,
        solve_budget, budget, new_tokens, repeats, frames, progress=gr.Progress(),  # noqa: B008 - how Gradio finds it
    ):  # fmt: skip
        try:
            progress(0.0, desc="loading the model")
            loaded = load_model(name, device)
            media = read_media(path, int(frames))
            if mode == MODES[1]:
                choice = Choice("method", method=method, budget=float(budget) if solve_budget else None)
            else:
                keywords = dict(
                    encoder_layers=enc_layers, encoder_removal=enc_removal, llm_layers=llm_layers,
                    llm_keep_ratio=keep, recycle=recycle,
                )  # fmt: skip
                choice = Choice("preset", preset=preset, fields=keywords)
            result = compare(
                loaded, media, question, choice, new_tokens=int(new_tokens), repeats=int(repeats),
                progress=lambda f, text: progress(f, desc=text),
            )  # fmt: skip
        except (MediaError, ModelError, ValueError, TypeError) as error:
            raise page_error(error) from None
        except Exception as error:  # noqa: BLE001 - never a stack trace in the page; the log has it
            traceback.print_exc()
            raise gr.Error(f"{type(error).__name__}: {_first_line(error)}", print_exception=False) from None
        return (
            result.stock.answer,
            result.illava.answer,
            result.markdown(),
            result.overview(),
            _pictures_for_gallery(result),
            result.as_dict(),
        )

    with gr.Blocks(title="illava: stock vs iLLaVA") as demo:
        gr.Markdown(
            "## illava: stock vs iLLaVA, side by side\n"
            "Pick an image or a video and a question; one click runs the stock model and the model with "
            "iLLaVA (or a peer method) on it: the answers, the prefill time (median of alternated runs), "
            "the visual tokens per stage, the share of stock prefill FLOPs, and what was merged at every "
            "stage (`illava viz`)."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                model_box = gr.Dropdown(
                    choices=list(BUILT_IN), value=default.name, allow_custom_value=True, label="model",
                    info="a shipped model (real weights, or the small easy-VQA one), or type a local folder / "
                    "hub id of a supported model",
                    elem_id="illava-model",
                )  # fmt: skip
                model_info = gr.Markdown(describe(default), label="model info", elem_id="illava-model-info")
                with gr.Row():
                    # no file_types: every upload reaches read_media, whose messages say what is wrong
                    media = gr.File(label="image or video", type="filepath", height=150, elem_id="illava-media")
                    preview = gr.Image(label="input", interactive=False, height=150, elem_id="illava-preview")
                media_info = gr.Markdown(label="media info", elem_id="illava-media-info")
                question = gr.Textbox(label="question", value=DEFAULT_QUESTION, elem_id="illava-question")
                gr.Examples(
                    examples=[[path, q] for path, q, _ in rows],
                    inputs=[media, question],
                    example_labels=[label for _, _, label in rows],
                    label="bundled examples (easy-VQA test split; the shipped model never saw videos in training)",
                    elem_id="illava-examples",
                )
                mode = gr.Radio(list(MODES), value=MODES[0], label="what runs beside stock", elem_id="illava-mode")
                with gr.Group(visible=True) as preset_group:
                    preset = gr.Dropdown(list(PRESETS), value="image", label="preset", elem_id="illava-preset")
                    enc_layers = gr.Textbox(fields.encoder_layers, label="encoder merge layers (0-based)")
                    enc_removal = gr.Slider(
                        0, fields.removal_max, value=fields.encoder_removal, step=fields.removal_step,
                        label=_removal_label(fields),
                    )  # fmt: skip
                    llm_layers = gr.Textbox(fields.llm_layers, label="LLM merge layers")
                    keep = gr.Slider(0.05, 1.0, value=fields.llm_keep_ratio, step=0.01, label="LLM keep ratio")
                    recycle = gr.Radio(list(RECYCLE_MODES), value=fields.recycle, label="recycle")
                with gr.Group(visible=False) as method_group:
                    method = gr.Dropdown(list(METHODS), value="illava", label="method (docs/peers.md)")
                    solve_budget = gr.Checkbox(True, label="solve the method's knob for a FLOPs budget")
                    budget = gr.Slider(0.05, 1.0, value=0.5, step=0.01, label="budget: share of stock prefill FLOPs")
                with gr.Accordion("run settings", open=False):
                    new_tokens = gr.Slider(1, 64, value=8, step=1, label="new tokens (greedy)")
                    repeats = gr.Slider(1, 50, value=5, step=1, label="timed prefills of each (alternated)")
                    frames = gr.Slider(1, MAX_FRAMES, value=8, step=1, label="video frames used")
                button = gr.Button("Compare stock vs iLLaVA", variant="primary", elem_id="illava-run")
            with gr.Column(scale=3):
                with gr.Row():
                    stock_answer = gr.Textbox(label="stock answer", interactive=False, elem_id="illava-answer-stock")
                    illava_answer = gr.Textbox(label="iLLaVA answer", interactive=False, elem_id="illava-answer-illava")
                summary = gr.Markdown(label="result", elem_id="illava-summary")
                gr.Markdown(
                    "**What was merged** on the iLLaVA side (`illava viz`; below: the input, the first scores, the "
                    "last encoder merge layer and the LLM layers; then every stage). Grey = removed without "
                    "recycling, tint = recycled into the survivor outlined in the same colour, thin white outline = "
                    "survivor; heat maps = rank of the score among the tokens present (bright = high)."
                )
                overview = gr.Image(
                    label="what was merged", show_label=False, interactive=False, format="png",
                    elem_id="illava-overview",
                )  # fmt: skip
                gallery = gr.Gallery(
                    label="every stage", columns=2, height=420, format="png", object_fit="contain",
                    elem_id="illava-pictures",
                )  # fmt: skip
                with gr.Accordion("all numbers (JSON)", open=False):
                    details = gr.JSON(label="numbers", elem_id="illava-details")
        field_outputs = [enc_layers, enc_removal, llm_layers, keep, recycle]
        model_box.change(on_model, [model_box, preset], [*field_outputs, model_info], api_name="model")
        preset.change(on_preset, [model_box, preset], field_outputs, api_name="preset_fields")
        media.change(on_media, [media, frames, preset], [preview, media_info, preset], api_name="preview")
        mode.change(on_mode, mode, [preset_group, method_group], api_name=False)
        button.click(
            run,
            [model_box, media, question, mode, preset, enc_layers, enc_removal, llm_layers, keep, recycle, method,
             solve_budget, budget, new_tokens, repeats, frames],
            [stock_answer, illava_answer, summary, overview, gallery, details],
            api_name="compare",
        )  # fmt: skip
    return demo


def _removal_label(f: Fields) -> str:
    if f.removal_kind == "count":
        return "encoder removal per merge layer (tokens per crop / frame)"
    return "encoder removal per merge layer (share of the units present)"


def _field_updates(gr, f: Fields) -> tuple:
    return (
        f.encoder_layers,
        gr.update(value=f.encoder_removal, maximum=f.removal_max, step=f.removal_step, label=_removal_label(f)),
        f.llm_layers,
        f.llm_keep_ratio,
        f.recycle,
    )


def launch_app(demo, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True, quiet=False):
    """Serve a page of ``build_app`` on ``host:port`` (127.0.0.1 by default: this machine only; a
    public link only with ``share=True``). ``block=False`` returns at once (``demo.close()`` stops
    it). A port in use raises ``OSError``."""
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=False,
        prevent_thread_lock=not block,
        show_error=False,  # the page shows the messages of gr.Error only, never a stack trace
        quiet=quiet,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(examples_dir())],
    )
    return demo


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    model: str | None = None,
    device: str = "cpu",
    block: bool = True,
    quiet: bool = False,
):
    """``build_app`` + ``launch_app``: the page for ``model`` (default: the real-weights LLaVA), served."""
    return launch_app(build_app(model, device), host, port, share, block, quiet)
