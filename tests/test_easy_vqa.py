"""easy-VQA harness: the training script's model format, the evaluation of every setting, the
broken-scorer control, and `illava eval easy-vqa`. The weights here are random, so these tests check
the machinery; tests/test_fidelity.py checks accuracy with the shipped model."""

import json

import pytest
import torch
from typer.testing import CliRunner

import illava
from illava.testing import InvertedScores
from illava.tools.cli import app
from illava_tasks import easy_vqa


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model saved exactly as training/train_easy_vqa.py saves one, with random weights."""
    import easy_vqa as data
    from transformers import LlavaOnevisionForConditionalGeneration

    questions = data.get_train_questions()[0] + data.get_test_questions()[0]
    tokenizer = easy_vqa.build_tokenizer(questions + data.get_answers())
    torch.manual_seed(0)
    config = easy_vqa.build_config(len(tokenizer))
    config.text_config.initializer_range = config.vision_config.initializer_range = 0.2
    path = tmp_path_factory.mktemp("evqa") / "model"
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    easy_vqa.image_processor().save_pretrained(path)
    return path


def test_model_format_loads_with_auto_classes(folder):
    model, tokenizer, processor = easy_vqa.load(folder)
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    vc = model.config.vision_config
    assert (vc.image_size // vc.patch_size) ** 2 >= 196  # merging must matter
    for answer in ["circle", "rectangle", "triangle", "teal", "yes", "no"]:
        assert tokenizer.convert_tokens_to_ids(answer) != tokenizer.unk_token_id  # every answer is one token
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == easy_vqa.prompt("what color is the shape?")
    assert processor.size["height"] == vc.image_size


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one with"):
        easy_vqa.load(tmp_path)
    result = CliRunner().invoke(app, ["eval", "easy-vqa", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "train one with" in result.output


def test_accuracy_is_what_the_model_answers(folder):
    """The harness' accuracy equals a hand-made count of first-token answers, one question at a time."""
    from PIL import Image

    from illava.tools.inputs import build

    model, tokenizer, processor = easy_vqa.load(folder)
    rows = easy_vqa.test_questions(12)
    hits = 0
    for q, a, path in rows:
        image = Image.open(path).convert("RGB")
        inputs = build(model.config, tokenizer, [easy_vqa.prompt(q)], [image], image_processor=processor)
        with torch.no_grad():
            token = model(**inputs).logits[0, -1].argmax().item()
        hits += tokenizer.convert_ids_to_tokens(token) == a
    assert easy_vqa.accuracy(model, tokenizer, processor, rows, batch=5) == pytest.approx(hits / len(rows))


def test_image_preset_cuts_flops_more_than_twofold(folder):
    model, tokenizer, processor = easy_vqa.load(folder)
    row = easy_vqa.test_questions(1)[0]
    stock, stock_tokens = easy_vqa._flops(model, tokenizer, processor, row)
    illava.apply(model, "image")
    ours, tokens = easy_vqa._flops(model, tokenizer, processor, row)
    assert stock_tokens == {"stock": 406, "after_encoder": 406, "after_llm": 406}
    assert tokens["after_llm"] < tokens["after_encoder"] < 406
    assert stock / ours >= 2.0


def test_inverted_scores_keep_the_lowest_through_the_stages(folder):
    """The broken scorer is a policy of the stages: it keeps the lowest-scored tokens (pruned), and
    every stage of every family calls it (the setting of the eval uses it)."""
    x = torch.arange(6.0).view(1, 6, 1)
    attention = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.8, 0.3]])
    policy = InvertedScores()
    config = illava.IllavaConfig(recycle="rank")
    assert policy.reduce("encoder", x, policy.scores("encoder", attention), 3, config).kept.tolist() == [[0, 3, 5]]
    model, _, _ = easy_vqa.load(folder)
    (name, broken) = easy_vqa.settings(model, ())[-1]
    assert "INVERTED" in name and isinstance(broken.policy, InvertedScores)


def test_eval_command_table_json_and_plot(folder, tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    args = ["eval", "easy-vqa", "--model", str(folder), "--limit", "16", "--levels", "1.5"]
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--plot", str(png)], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    names = [s["setting"] for s in scores]
    assert names[0] == "stock" and "preset image" in names and "image, recycle cluster" in names
    assert "image x1.5" in names and any("INVERTED" in n for n in names)
    assert all(0 <= s["accuracy"] <= 1 and s["gflops"] > 0 for s in scores)
    flops = {s["setting"]: s["gflops"] for s in scores}
    assert flops["image x1.5"] < flops["preset image"] < flops["stock"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_question_kinds_and_open_subset():
    assert easy_vqa.question_kind("what is the blue shape?", "circle") == "open"
    assert easy_vqa.question_kind("is there a circle?", "yes") == "present"
    assert easy_vqa.question_kind("is there not a circle?", "no") == "present"
    assert easy_vqa.question_kind("is no blue shape present?", "no") == "present"
    assert easy_vqa.question_kind("is no blue shape present?", "yes") == "absent"
    assert easy_vqa.question_kind("does the image contain a red shape?", "no") == "absent"
    rows = easy_vqa.test_questions(None, kinds="open")
    assert len(rows) == 2537 and all(a not in ("yes", "no") for _, a, _ in rows)
    assert easy_vqa.test_questions(50, kinds="open") == easy_vqa.test_questions(50, kinds="open")
    with pytest.raises(ValueError, match="kinds"):
        easy_vqa.test_questions(5, kinds="yes/no")


def test_methods_at_matched_budgets_table_json_and_plot(folder, tmp_path):
    """`illava eval easy-vqa --methods ...`: stock first (agreement 100 %, KL 0), every method at
    every budget, its achieved share next to the target, the figure."""
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    args = ["eval", "easy-vqa", "--model", str(folder), "--limit", "10", "--methods", "illava-rank,fastv"]
    result = CliRunner().invoke(
        app, [*args, "--budgets", "0.6,1", "--json", str(out), "--plot", str(png)], env={"COLUMNS": "220"}
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    scores = report["scores"]
    assert report["questions"]["all"] == 10 and report["questions"]["open"] == 10
    assert scores[0]["method"] == "stock" and scores[0]["agreement"] == 1 and scores[0]["kl"] == pytest.approx(0)
    assert [(s["method"], s["target"]) for s in scores[1:]] == [
        (m, b) for m in ("illava-rank", "fastv") for b in (0.6, 1.0)
    ]
    for s in scores[1:]:
        assert s["share"] <= s["target"] + 1e-9 or not s["reached"]
        if s["target"] == 1.0:  # the whole budget: the method at its least reduction is stock
            assert s["agreement"] == 1 and s["kl"] == pytest.approx(0, abs=1e-6), s
        else:
            assert s["kl"] >= 0 and 0 <= s["accuracy_open"] <= 1
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_kl_and_agreement_are_computed_against_stock(folder):
    """A hand check of the instrument: KL and agreement of a method equal those computed from the
    stock and method distributions directly."""
    model, tokenizer, processor = easy_vqa.load(folder)
    rows, in_all, in_open = easy_vqa.question_sets(6)
    scores = easy_vqa.compare_methods(model, tokenizer, processor, rows, in_all, in_open, ["divprune"], [0.7])
    stock = easy_vqa.predict(model, tokenizer, processor, rows)
    illava.apply(model, illava.IllavaConfig(feature_keep=0.0 + scores[1].knob, policy=illava.DivPrune()))
    method = easy_vqa.predict(model, tokenizer, processor, rows)
    illava.remove(model)
    p = stock.exp()
    assert scores[1].kl == pytest.approx((p * (stock - method)).sum(-1).mean().item(), rel=1e-5)
    assert scores[1].agreement == pytest.approx((stock.argmax(-1) == method.argmax(-1)).float().mean().item())


def test_open_only_comparison_with_the_measured_schedule_in_bfloat16(folder, tmp_path):
    """Issue 38's run: `--open-only` scores the open questions alone, `illava-measured` measures the
    tower's layer profile first (printed), `--dtype bfloat16` runs the model in it, and the table gives
    a standard error next to the open accuracy."""
    out = tmp_path / "o.json"
    args = ["eval", "easy-vqa", "--model", str(folder), "--limit", "12", "--open-only", "--dtype", "bfloat16"]
    args += ["--methods", "illava-measured,random-encoder", "--budgets", "0.6", "--json", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "received-attention lift per encoder layer (4 sample photos): L0 " in result.output
    assert "12 open questions" in result.output and "± " in result.output
    report = json.loads(out.read_text())
    assert report["questions"] == {"all": 12, "open": 12, "evaluated": 12}
    assert [s["method"] for s in report["scores"]] == ["stock", "illava-measured", "random-encoder"]
    assert "RandomScores" in report["scores"][2]["config"]
    rows, in_all, in_open = easy_vqa.question_sets(12, open_only=True)
    assert len(rows) == 12 and bool(in_all.all()) and bool(in_open.all())
    assert all(easy_vqa.question_kind(q, a) == "open" for q, a, _ in rows)
    bad = CliRunner().invoke(app, ["eval", "easy-vqa", "--model", str(folder), "--dtype", "float8"])
    assert bad.exit_code == 2 and "--dtype" in bad.output
