"""``illava tune`` (issue 40): the choice rule on constructed candidates, the inputs it reads, the tuned
file's round trip through ``illava.apply`` and the vLLM plugin's resolver, its refusals, and the
command on the small shipped model."""

import json

import pytest
import torch
from typer.testing import CliRunner

import illava
from illava import tuned
from illava.tools import tune as t
from illava.tools.architectures import tiny_config
from illava.tools.cli import app
from illava.vllm.config import resolve
from illava.vllm.families import llava, qwen_vl


def _c(name, share, agreement, kl=0.1):
    return t.Candidate(name, {"method": name}, 0.5, share, True, name, agreement=agreement, kl=kl)


def test_the_choice_rule_on_constructed_candidates():
    cands = [
        _c("over-budget-but-perfect", 0.60, 1.00, 0.0),
        _c("good", 0.50, 0.96, 0.20),
        _c("good-lower-kl", 0.505, 0.96, 0.05),  # within the 1 % slack of a 50 % budget
        _c("cheap", 0.20, 0.80, 0.9),
        _c("cheaper", 0.10, 0.50, 2.0),
    ]
    # a budget: the best agreement within it, ties broken by KL; a candidate over it never wins
    assert t.choose(cands, budget=0.5).name == "good-lower-kl"
    assert t.choose(cands, budget=0.2).name == "cheap"
    assert t.choose(cands, budget=1.0).name == "over-budget-but-perfect"
    with pytest.raises(ValueError, match="cheapest is cheaper at 10.0%"):
        t.choose(cands, budget=0.05)
    # an agreement target: the cheapest keeping it
    assert t.choose(cands, agreement=0.95).name == "good"
    assert t.choose(cands, agreement=0.8).name == "cheap"
    assert t.choose(cands, agreement=0.99).name == "over-budget-but-perfect"
    with pytest.raises(ValueError, match="closest is good-lower-kl with 96.0%"):
        t.choose(cands[1:], agreement=0.99)
    with pytest.raises(ValueError, match="exactly one"):
        t.choose(cands, budget=0.5, agreement=0.9)


def test_inputs_from_a_jsonl_or_a_folder(tmp_path):
    from PIL import Image

    for n in range(3):
        Image.new("RGB", (32, 32), (n * 60, 0, 0)).save(tmp_path / f"{n}.png")
    lines = [{"image": "0.png", "prompt": "what colour?"}, {"image": str(tmp_path / "1.png")}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = t.read_inputs(tmp_path / "in.jsonl", prompt="default?")
    assert [(r.prompt, r.image) for r in rows] == [
        ("what colour?", str(tmp_path / "0.png")),
        ("default?", str(tmp_path / "1.png")),
    ]
    folder = t.read_inputs(tmp_path, prompt="p", limit=2)
    assert [r.image for r in folder] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    bad = {
        "nope.jsonl": None,
        "both.jsonl": '{"image": "0.png", "video": "0.png"}',
        "missing.jsonl": '{"image": "9.png"}',
        "broken.jsonl": "{",
        "empty.jsonl": "\n",
    }
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ValueError):
            t.read_inputs(tmp_path / name)
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image"):
        t.read_inputs(empty)


def _model(name):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(tiny_config(name)).eval()


def _file(path, model, spec, name="tiny"):
    config = t._config_of(model, spec)
    pick = t.Candidate("x", spec, 0.5, 0.5, True, str(config), agreement=0.9, kl=0.1)
    return t.save(path, model, name, pick, [pick], engine="vllm", rule={"budget": 0.5}, inputs=3, tokens=4, seconds=1)


@pytest.mark.parametrize(
    "arch, family, spec",
    [
        ("tiny-llava", llava, {"method": "tome", "knob": 3}),
        ("tiny-qwen2-vl", qwen_vl, {"method": "visionzip", "knob": 0.4}),
        ("tiny-qwen2.5-vl", qwen_vl, {"preset": "encoder-only"}),
        ("tiny-llava", llava, {"method": "illava-encoder", "knob": 0.8, "encoder_layers": [0]}),
    ],
)
def test_a_tuned_file_means_the_same_configuration_in_both_engines(tmp_path, arch, family, spec):
    model = _model(arch)
    path = _file(tmp_path / "tuned.json", model, spec)
    expected = t._config_of(model, spec)
    assert illava.configure(model, str(path)) == expected
    assert resolve(str(path), family(model.config)) == expected  # ILLAVA_VLLM=tuned.json
    # apply takes the file and runs as the configuration does
    ids = torch.tensor([[5, 6, 7]])
    illava.apply(model, str(path))
    assert illava.config_of(model) == expected
    with torch.no_grad():
        model(input_ids=ids)
    illava.remove(model)


def test_a_file_for_another_family_or_size_is_refused(tmp_path):
    llava_model, qwen_model = _model("tiny-llava"), _model("tiny-qwen2-vl")
    path = _file(tmp_path / "tuned.json", llava_model, {"method": "tome", "knob": 3}, name="my-llava")
    with pytest.raises(ValueError, match="tuned for another model \\(my-llava: model_type llava"):
        illava.configure(qwen_model, str(path))
    with pytest.raises(ValueError, match="illava.vllm: .* tuned for another model"):
        resolve(str(path), qwen_vl(qwen_model.config))
    data = json.loads(path.read_text())
    data["model"]["llm_depth"] += 1  # the same family, another size
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="llm_depth"):
        illava.configure(llava_model, str(path))
    (tmp_path / "other.json").write_text('{"method": "tome"}')
    with pytest.raises(ValueError, match="not a file of illava tune"):
        illava.configure(llava_model, str(tmp_path / "other.json"))
    with pytest.raises(FileNotFoundError, match="illava tune"):
        illava.configure(llava_model, str(tmp_path / "absent.json"))
    with pytest.raises(TypeError, match="its own knob"):
        illava.configure(llava_model, str(tmp_path / "other.json"), 0.5)
    assert not tuned.is_tuned_path("tome") and tuned.is_tuned_path("a/b/Tuned.JSON")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import shutil

    from illava_tasks import easy_vqa

    folder = tmp_path_factory.mktemp("tune-inputs")
    with open(folder / "in.jsonl", "w") as f:
        for n, (q, _, p) in enumerate(easy_vqa.test_questions(5, seed=5, kinds="open")):
            shutil.copy(p, folder / f"{n}.png")
            f.write(json.dumps({"image": f"{n}.png", "prompt": q}) + "\n")
    return folder / "in.jsonl"


def test_tune_command_on_the_shipped_small_model(inputs, tmp_path):
    """Every candidate is scored against stock's own outputs; the pick follows the rule; the file's
    evidence matches the table; illava.apply takes it; --engine vllm drops what the plugin cannot run."""
    out = tmp_path / "tuned.json"
    runner = CliRunner()
    args = ["tune", "easy-vqa", "--inputs", str(inputs), "--budget", "0.5", "--methods", "tome,fastv,illava-llm"]
    result = runner.invoke(app, [*args, "--out", str(out), "--tokens", "3"], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    names = [c["name"] for c in data["candidates"]]
    assert names == ["tome @ 50%", "fastv @ 50%", "illava-llm @ 50%"]
    assert data["evidence"]["inputs"] == 5 and "<- pick" in result.output
    cands = [t.Candidate(**c) for c in data["candidates"]]
    assert data["evidence"]["pick"] == t.choose(cands, budget=0.5).name
    for c in cands:
        assert 0 <= c.agreement <= 1 and c.kl >= -1e-6 and c.prefill_seconds > 0
    from illava_tasks import easy_vqa

    model = easy_vqa.load()[0]
    pick = next(c for c in cands if c.name == data["evidence"]["pick"])
    assert str(illava.configure(model, str(out))) == pick.config
    # vLLM: the LLM-stage methods (fastv, illava-llm) are not candidates
    served = runner.invoke(app, [*args, "--engine", "vllm", "--out", str(out)], env={"COLUMNS": "220"})
    assert served.exit_code == 0, served.output
    assert [c["name"] for c in json.loads(out.read_text())["candidates"]] == ["tome @ 50%"]
    assert "ILLAVA_VLLM=" in served.output


def test_tune_command_refusals(inputs, tmp_path):
    runner = CliRunner()
    base = ["tune", "easy-vqa", "--inputs", str(inputs), "--out", str(tmp_path / "t.json")]
    for extra, word in [
        (["--budget", "0.5", "--agreement", "0.9"], "not both"),
        (["--budget", "1.5"], "--budget"),
        (["--engine", "sglang"], "--engine"),
        (["--methods", "nope"], "unknown method"),
    ]:
        failed = runner.invoke(app, [*base, *extra], env={"COLUMNS": "220"})
        assert failed.exit_code == 2 and word in failed.output, failed.output
    bad = runner.invoke(app, ["tune", "easy-vqa", "--inputs", str(tmp_path / "none.jsonl")], env={"COLUMNS": "220"})
    assert bad.exit_code == 2 and "no such file" in bad.output
    # an agreement nothing keeps at these budgets: a clear refusal, no file
    strict = runner.invoke(app, [*base, "--agreement", "1.0", "--methods", "fastv"], env={"COLUMNS": "220"})
    if strict.exit_code == 0:  # fastv kept every answer: then the file exists and names it
        assert "fastv" in json.loads((tmp_path / "t.json").read_text())["evidence"]["pick"]
    else:
        assert strict.exit_code == 2 and "no candidate keeps 100%" in strict.output
        assert not (tmp_path / "t.json").exists()


def test_answers_are_cut_at_their_end_token():
    """Padding after the end token depends on the rest of the batch; agreement must not."""
    assert t._answer([5, 6, 2, 0, 0, 0], {2}) == (5, 6, 2)
    assert t._answer([5, 6, 2], {2, 9}) == (5, 6, 2)
    assert t._answer([5, 6, 7], {2}) == (5, 6, 7)
