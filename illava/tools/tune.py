"""``illava tune``: the best setting for a model on the user's own inputs, without labels.

What a reduction costs shows in how far the reduced model's outputs move from the stock model's on
the same inputs. So:

1. stock runs once per input: its greedy answer (the first ``tokens`` tokens) and its first-token
   distribution (reused by every candidate);
2. every candidate, each solved to the FLOPs budget(s) on the first input (``illava.tools.budget``),
   runs on every input: agreement of its greedy answer with stock's (the share of inputs whose first
   ``tokens`` tokens are equal), the mean KL(stock || candidate) of the first token, its prefill FLOPs
   share and its measured prefill time (the first two batches, as a speedup over stock's);
3. ``choose`` picks: with a budget, the candidate of highest agreement (then lowest KL) among those
   within it; with an agreement target, the cheapest candidate (lowest FLOPs share, then lowest KL)
   keeping at least that agreement.

Candidates: every method of ``illava.methods`` (``illava-measured``: the layers the rule picks on the
inputs' own images; ``tome-illava``: the two-stage hybrid), each presets at its own FLOPs
(``image``, ``encoder-only``, ``llm-only``). With ``engine="vllm"`` only those the vLLM plugin runs
(no LLM stage, no measured profile).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import api, tuned
from ..config import IllavaConfig

DEFAULT_PROMPT = "Describe the image in one word."
PRESET_CANDIDATES = ("image", "encoder-only", "llm-only")
AGREEMENT_GRID = (0.7, 0.5, 0.33, 0.2, 0.1)  # budgets tried when the rule is an agreement target
EXCLUDED = ("illava",)  # the alias of illava-rank


@dataclass
class Input:
    prompt: str
    image: str | None = None
    video: str | None = None


@dataclass
class Candidate:
    name: str  # "tome @ 50%", "image (preset)"
    spec: dict  # what the tuned file stores (``illava.tuned``)
    target: float | None  # FLOPs share asked for (None: a preset at its own)
    share: float  # achieved share of stock prefill FLOPs
    reached: bool
    config: str
    agreement: float = 0.0
    kl: float = 0.0
    prefill_seconds: float = 0.0
    prefill_speedup: float = 0.0
    visual_tokens: dict = field(default_factory=dict)


def read_inputs(path: str | Path, prompt: str = DEFAULT_PROMPT, limit: int | None = None) -> list[Input]:
    """A JSONL of ``{"image" | "video": file, "prompt": text}`` (files relative to the JSONL's folder),
    or a folder of images (each with ``prompt``); ``ValueError`` naming the problem."""
    path = Path(path)
    out: list[Input] = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ValueError(f"{path} holds no image (.png, .jpg, .jpeg, .webp, .bmp)")
        out = [Input(prompt, image=str(p)) for p in files]
    elif path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{n}: not JSON ({error})") from None
            if not isinstance(row, dict) or ("image" in row) == ("video" in row):
                raise ValueError(f'{path}:{n}: each line needs exactly one of "image" or "video" (and "prompt")')
            media = Path(row.get("image") or row.get("video"))
            media = media if media.is_absolute() else path.parent / media
            if not media.exists():
                raise ValueError(f"{path}:{n}: no file {media}")
            kind = "image" if "image" in row else "video"
            out.append(Input(str(row.get("prompt") or prompt), **{kind: str(media)}))
        if not out:
            raise ValueError(f"{path} has no input line")
    else:
        raise ValueError(f"--inputs {path}: no such file or folder")
    return out[:limit] if limit else out


def chat_prompt(tokenizer, text: str, marker: str) -> str:
    """``text`` after the media marker, in the tokenizer's chat format (as is when it has none)."""
    content = f"{marker}\n{text}"
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        except Exception:  # a template that wants structured content: the plain text below
            pass
    return content + "\n"


def batches(model, tokenizer, processor, inputs: list[Input], batch: int) -> list[dict]:
    """Model inputs of ``inputs``, ``batch`` at a time (images and videos apart: one kind per batch)."""
    from PIL import Image

    from .inputs import build, for_model

    out = []
    for kind in ("image", "video"):
        group = [x for x in inputs if getattr(x, kind)]
        for start in range(0, len(group), batch):
            chunk = group[start : start + batch]
            prompts = [chat_prompt(tokenizer, x.prompt, f"<{kind}>") for x in chunk]
            if kind == "image":
                media = {"images": [Image.open(x.image).convert("RGB") for x in chunk]}
            else:
                media = {"videos": [_frames(x.video) for x in chunk]}
            built = build(model.config, tokenizer, prompts, image_processor=processor, **media)
            out.append(for_model(built, model))
    return out


def _frames(path: str):
    """A video's frames (``torchvision.io.read_video``; one clear error without a reader)."""
    try:
        from torchvision.io import read_video
    except ImportError as error:
        raise ValueError(f"reading the video {path} needs torchvision ({error})") from None
    frames, _, _ = read_video(path, pts_unit="sec", output_format="TCHW")
    return frames


@dataclass
class Outputs:
    answers: list[tuple[int, ...]]  # the first ``tokens`` greedy tokens of every input
    log_probs: torch.Tensor  # (inputs, vocab) first token
    seconds: float  # prefill time of the timed batches


def run_inputs(model, prepared: list[dict], tokens: int, timing_batches: int = 2) -> Outputs:
    """Greedy generation of ``tokens`` tokens per input (the answer; the first step's logits: the
    first token's distribution), then the prefill timed on the first ``timing_batches`` batches (the
    faster of two runs each); the model as it is set up."""
    answers: list[tuple[int, ...]] = []
    probs = []
    ends = _ends(model)
    with torch.inference_mode():
        for inputs in prepared:
            out = model.generate(
                **inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=_pad(model),
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
            probs.append(torch.log_softmax(out.logits[0].float(), -1))
            new = out.sequences[:, inputs["input_ids"].shape[1] :]
            answers += [_answer(row.tolist(), ends) for row in new]
    seconds = min(_timed(model, prepared[:timing_batches]) for _ in range(2))
    return Outputs(answers, torch.cat(probs), seconds)


def _ends(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _answer(ids: list[int], ends: set[int]) -> tuple[int, ...]:
    """The generated ids up to and including the first end token (what follows is padding, whose
    length depends on the other inputs of the batch)."""
    for n, token in enumerate(ids):
        if token in ends:
            return tuple(ids[: n + 1])
    return tuple(ids)


def _pad(model) -> int:
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return 0 if pad is None else int(pad)


def candidates_for(model, methods: list[str], engine: str) -> list[str]:
    """The method names that take part: ``methods`` (default every method), for the vLLM engine only
    those the plugin serves."""
    from ..methods import METHODS

    names = list(methods) if methods else [m for m in METHODS if m not in EXCLUDED]
    if engine == "vllm":
        from ..vllm.config import SERVED_METHODS

        names = [m for m in names if m in SERVED_METHODS]
    return names


def _servable(config: IllavaConfig, engine: str) -> bool:
    return engine != "vllm" or not config.llm_layers


def tune(
    model,
    tokenizer,
    processor,
    inputs: list[Input],
    *,
    budgets: tuple[float, ...],
    methods: list[str] | None = None,
    engine: str = "transformers",
    tokens: int = 8,
    batch: int = 10,
    progress: Callable[[str], None] | None = None,
) -> tuple[Outputs, list[Candidate]]:
    """Stock's outputs and every candidate's measures (module docstring)."""
    from .budget import solve_all

    say = progress or (lambda message: None)
    api.remove(model)
    prepared = batches(model, tokenizer, processor, inputs, batch)
    say(f"stock on {len(inputs)} inputs")
    with torch.inference_mode():  # a warm-up forward: the first call's one-off costs stay out of stock's time
        model(**prepared[0], use_cache=False, logits_to_keep=1)
    stock = run_inputs(model, prepared, tokens)
    names = candidates_for(model, methods or [], engine)
    if "illava-measured" in names:
        from . import schedule

        pictures = [x for x in inputs if x.image][:4]
        if pictures:
            say("measuring the encoder's layer profile on the inputs' images")
            profile = schedule.layer_profile(model, batches(model, tokenizer, processor, pictures, 4)[0], len(pictures))
            schedule.remember(model, profile)
        else:
            names.remove("illava-measured")
    probe = batches(model, tokenizer, processor, inputs[:1], 1)[0]
    solved = solve_all(model, names, budgets, probe, progress=lambda s: say(f"solved {s.method} @ {100 * s.target:g}%"))
    out: list[Candidate] = []
    for s in solved:
        if not _servable(s.config, engine):
            continue
        spec: dict = {"method": s.method, "knob": s.knob}
        if s.method == "illava-measured":  # a file must not need the profile: the layers it chose
            spec = {"method": "illava-rank", "knob": s.knob, "encoder_layers": list(s.config.encoder_layers)}
        out.append(Candidate(f"{s.method} @ {100 * s.target:g}%", spec, s.target, s.share, s.reached,
                             str(s.config), visual_tokens=dict(s.tokens)))  # fmt: skip
    stock_flops = None
    for name in PRESET_CANDIDATES if not methods else ():  # the presets take part when no method is named
        config = api.configure(model, name)
        if not config.reduces or not _servable(config, engine):
            continue
        if stock_flops is None:
            stock_flops = _flops(model, probe, IllavaConfig())
        share = _flops(model, probe, config) / stock_flops
        out.append(Candidate(f"{name} (preset)", {"preset": name}, None, share, True, str(config)))
    done: dict[str, Outputs] = {}
    for n, c in enumerate(out, 1):
        say(f"[{n}/{len(out)}] {c.name}")
        key = c.config
        if key not in done:
            config = _config_of(model, c.spec)
            if str(config) != c.config:  # the file must mean what was measured
                raise RuntimeError(f"illava tune: the spec {c.spec} gives {config}, not the solved {c.config}")
            api.apply(model, config)
            try:
                done[key] = run_inputs(model, prepared, tokens)
            finally:
                api.remove(model)
        got = done[key]
        c.agreement = sum(a == b for a, b in zip(got.answers, stock.answers)) / len(stock.answers)
        c.kl = (stock.log_probs.exp() * (stock.log_probs - got.log_probs)).sum(-1).mean().item()
        c.prefill_seconds = got.seconds
    stock.seconds = min(stock.seconds, _timed(model, prepared[:2]))  # stock again after the candidates: its faster run
    for c in out:
        got = done[c.config]
        c.prefill_speedup = stock.seconds / got.seconds if got.seconds else 0.0
    return stock, out


def _timed(model, prepared: list[dict]) -> float:
    seconds = 0.0
    with torch.inference_mode():
        for inputs in prepared:
            start = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            seconds += time.perf_counter() - start
    return seconds


def _config_of(model, spec: dict) -> IllavaConfig:
    fields = dict(spec)
    name = fields.pop("preset", None) or fields.pop("method", None)
    knob = fields.pop("knob", None)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return api.configure(model, name, knob, **fields)


def _flops(model, inputs: dict, config: IllavaConfig) -> float:
    from .flops import prefill_flops

    api.apply(model, config)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False, logits_to_keep=1)
        return prefill_flops(model, api.stats(model), inputs["input_ids"].shape[1])["total"]
    finally:
        api.remove(model)


def choose(candidates: list[Candidate], budget: float | None = None, agreement: float | None = None) -> Candidate:
    """With ``budget``: the highest agreement (then lowest KL, then lowest share) among candidates whose
    FLOPs share is within it (1 % slack for the solver's whole tokens). With ``agreement``: the lowest
    FLOPs share (then lowest KL) among candidates keeping at least that agreement. ``ValueError`` when
    none qualifies, naming the closest."""
    if (budget is None) == (agreement is None):
        raise ValueError("choose with exactly one of budget or agreement")
    if budget is not None:
        within = [c for c in candidates if c.share <= budget + 0.01]
        if not within:
            cheapest = min(candidates, key=lambda c: c.share)
            raise ValueError(
                f"no candidate reaches {100 * budget:g}% of stock prefill FLOPs; the cheapest is {cheapest.name} at "
                f"{100 * cheapest.share:.1f}%"
            )
        return max(within, key=lambda c: (c.agreement, -c.kl, -c.share))
    keeping = [c for c in candidates if c.agreement >= agreement - 1e-12]
    if not keeping:
        best = max(candidates, key=lambda c: (c.agreement, -c.kl))
        raise ValueError(
            f"no candidate keeps {100 * agreement:g}% agreement with stock; the closest is {best.name} with "
            f"{100 * best.agreement:.1f}% at {100 * best.share:.1f}% of the FLOPs: ask for less agreement, or a "
            "larger budget"
        )
    return min(keeping, key=lambda c: (c.share, c.kl))


def identity(model, name: str) -> dict:
    from ..adapters import adapter_for

    return {"name": name, "model_type": model.config.model_type, **adapter_for(model).dimensions(model).as_dict()}


def save(path, model, name: str, pick: Candidate, candidates: list[Candidate], *, engine: str, rule: dict,
         inputs: int, tokens: int, seconds: float) -> Path:  # fmt: skip
    """The tuned file (``illava.tuned``) with the pick, its evidence and every candidate's measures."""
    return tuned.write(
        path,
        {
            "spec": pick.spec,
            "config": pick.config,
            "model": identity(model, name),
            "engine": engine,
            "rule": rule,
            "evidence": {
                "inputs": inputs,
                "answer_tokens": tokens,
                "pick": pick.name,
                "agreement": pick.agreement,
                "kl": pick.kl,
                "flops_share": pick.share,
                "prefill_speedup": pick.prefill_speedup,
                "tune_seconds": round(seconds, 1),
            },
            "candidates": [asdict(c) for c in candidates],
        },
    )
