"""Gradient checkpointing with illava applied: every vision-encoder layer is checkpointed as in stock,
the merge layers included, and the loss and gradients are those of the same model without
checkpointing (the recomputation during backward makes the merge decisions of the forward)."""

from collections import Counter
from contextlib import nullcontext

import pytest
import torch
from families import FAMILIES, chat

import illava
from illava.adapters import adapter_for

PROMPT = chat("<image>\nwhat is shown in this image?")

# case -> (method, use_reentrant, attention implementation, recording, output_attentions):
# - both-stages: the family's two-stage configuration, with transformers' default (non-reentrant);
# - tome-reentrant: merges at every encoder layer whose decisions depend on the earlier ones (token
#   sizes, proportional attention), recomputed by reentrant checkpointing;
# - recording: ToMe while illava.tools.viz records the source tracking (the forward then measures
#   the attention every token receives, which ToMe itself does not need);
# - attention-maps: output_attentions=True with eager attention (the merge layers then run the stock
#   attention module, so that their maps are collected).
CASES = {
    "both-stages": ("both-stages", False, "sdpa", False, False),
    "tome-reentrant": ("tome", True, "sdpa", False, False),
    "recording": ("tome", False, "sdpa", True, False),
    "attention-maps": ("both-stages", False, "eager", False, True),
}


def _train_step(fam, model, photos, checkpointing: bool, case: str):
    """Loss, gradients and the calls of ``_gradient_checkpointing_func`` by module of one training step."""
    _, reentrant, _, recording, attentions = CASES[case]
    calls = Counter()
    if checkpointing:
        # gradient_checkpointing_enable, by its current name (the old one warns, FutureWarning)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        for name, module in model.named_modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                func = module._gradient_checkpointing_func

                def counted(*args, _func=func, _name=name, **kwargs):
                    calls[_name] += 1
                    return _func(*args, **kwargs)

                module._gradient_checkpointing_func = counted
    model.train()
    inputs = fam.build([PROMPT, PROMPT], [photos["cat"], photos["astronaut"]])
    torch.manual_seed(0)
    patched = getattr(model, "_illava", None)  # stock: nothing to record
    with patched.state.recording() if recording and patched is not None else nullcontext():
        loss = model(**inputs, labels=inputs["input_ids"].clone(), output_attentions=attentions).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


def _merge_layers(model) -> list[str]:
    """The names of the encoder's merge layers."""
    layers = adapter_for(model).encoder_layers(model)
    merging = {id(layers[i]) for i in illava.config_of(model).encoder_layers}
    return [name for name, module in model.named_modules() if id(module) in merging]


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def fam(request):
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_merge_layers_are_checkpointed_and_gradients_are_unchanged(fam, photos, case):
    method, _, attn, *_ = CASES[case]

    def make():
        model = fam.make(attn=attn)
        illava.apply(model, fam.both_stages() if method == "both-stages" else illava.configure(model, method))
        return model

    *_, stock_calls = _train_step(fam, fam.make(attn=attn), photos, True, case)
    loss, grads, _ = _train_step(fam, make(), photos, False, case)
    model = make()
    merge_layers = _merge_layers(model)
    loss_ckpt, grads_ckpt, calls = _train_step(fam, model, photos, True, case)
    assert merge_layers and all(calls[name] == 1 for name in merge_layers), (merge_layers, calls)
    assert calls == stock_calls  # every layer stock checkpoints, once per forward
    tokens = illava.stats(model).visual_tokens()
    assert tokens["after_encoder"] < tokens["stock"]
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)
