"""Methods at matched prefill FLOPs on a labelled task: what ``illava eval easy-vqa --methods`` and
``illava eval scenes --methods`` share.

``settings(...)`` yields stock first, then every (method, budget) with its knob solved by
``illava.tools.budget`` on one probe input, and the first answer token's log-probabilities of every
question under that setting; a budget out of a method's reach repeats its floor's configuration
(scored once). ``scored(...)`` turns them into a task's own scores (accuracy per kind) with the
agreement and KL against stock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import illava as api


@dataclass
class Setting:
    method: str
    target: float  # share of stock prefill FLOPs asked for (1.0: stock itself)
    share: float  # achieved
    knob: float | None
    reached: bool
    visual_tokens: dict
    config: str
    log_probs: torch.Tensor  # (questions, vocab), first answer token


def settings(
    model, methods, budgets, probe: dict, predict: Callable[[], torch.Tensor], progress=None
) -> Iterator[Setting]:
    """Stock, then every method at every budget (``probe``: the model's inputs of one question, on its
    device; ``predict()``: log-probabilities of every question with the model as it is set up).
    ``progress(solved)`` after each knob is solved."""
    from illava.tools.budget import solve_all

    api.remove(model)
    stock = predict()
    solved = solve_all(model, methods, budgets, probe, progress=progress)
    tokens = solved[0].tokens["stock"] if solved else None  # counted by the solver; unknown without methods
    counts = {} if tokens is None else {"stock": tokens, "after_encoder": tokens, "after_llm": tokens}
    yield Setting("stock", 1.0, 1.0, None, True, counts, "stock", stock)
    done: dict[str, torch.Tensor] = {}
    try:
        for s in solved:
            key = f"{s.config!s} {s.config.policy!r}"
            if key not in done:
                api.apply(model, s.config)
                done[key] = predict()
            yield Setting(s.method, s.target, s.share, s.knob, s.reached, s.tokens, str(s.config), done[key])
    finally:
        api.remove(model)


def scored(
    model,
    methods,
    budgets,
    probe: dict,
    predict: Callable[[], torch.Tensor],
    correct: Callable[[torch.Tensor], torch.Tensor],
    make: Callable[[Setting, torch.Tensor, float, float], object],
    progress=None,
    solved_progress=None,
) -> list:
    """Every setting of ``settings`` scored by a task: ``correct(log_probs)`` is the ``(questions,)``
    bool tensor of right answers, ``make(setting, ok, agreement, kl)`` the task's score of a setting
    (agreement and KL against stock's first answer token). ``progress(score)`` after each setting."""
    scores = []
    stock = None
    for s in settings(model, methods, budgets, probe, predict, progress=solved_progress):
        stock = s.log_probs if stock is None else stock
        agree, kl = agreement_and_kl(stock, s.log_probs)
        scores.append(make(s, correct(s.log_probs), agree, kl))
        if progress:
            progress(scores[-1])
    return scores


def agreement_and_kl(stock: torch.Tensor, log_probs: torch.Tensor) -> tuple[float, float]:
    """Share of questions whose first answer token is stock's, and the mean KL(stock || setting) in nats."""
    agree = (log_probs.argmax(-1) == stock.argmax(-1)).float().mean().item()
    kl = (stock.exp() * (stock - log_probs)).sum(-1).mean().item()
    return agree, kl


def stderr(p: float, n: int) -> float:
    """Standard error of a share ``p`` of ``n`` questions: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")
