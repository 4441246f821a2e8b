"""`illava serve`: the pure functions, the command line, the page driven by gradio_client (answers and
token counts equal the library's), and the page in headless Chromium (Debian's chromium +
chromedriver; skipped only where they are not installed)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageSequence
from typer.testing import CliRunner

import illava
from illava.tools import serve as web
from illava.tools.cli import app
from illava.tools.flops import prefill_flops
from illava.tools.inputs import build
from illava_tasks import easy_vqa

# gradio's queue uses pandas options that pandas 3 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword is deprecated)")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NEW_TOKENS = 4


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_gif(path: Path, frames: int) -> Path:
    images = []
    for i in range(frames):
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((4 + 2 * i, 10, 34 + 2 * i, 40), fill=(0, 0, 255))
        images.append(image)
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


@pytest.fixture(scope="module")
def direct():
    """The shipped model loaded on its own, for the library called directly."""
    model, tokenizer, processor = easy_vqa.load()
    return model, tokenizer, processor


def library_run(model, tokenizer, inputs, config) -> dict:
    """What the page must show, computed with the public API: stock and ``config`` answers
    (greedy, NEW_TOKENS), visual tokens per stage and prefill GFLOPs."""

    def answer() -> str:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def counts():
        stats = illava.stats(model)
        return stats.visual_tokens(), prefill_flops(model, stats, inputs["input_ids"].shape[1])["total"]

    illava.remove(model)
    stock_answer = answer()
    illava.apply(model, illava.IllavaConfig())  # counted, stock compute
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
    stock_tokens, stock_gflops = counts()
    illava.apply(model, config)
    merged_answer = answer()
    tokens, gflops = counts()
    from illava.tools.viz import visualize

    pictures = visualize(model, inputs).images
    illava.remove(model)
    return {
        "stock": {"answer": stock_answer, "visual_tokens": stock_tokens, "gflops": stock_gflops},
        "illava": {"answer": merged_answer, "visual_tokens": tokens, "gflops": gflops},
        "pictures": pictures,
    }


# ------------------------------------------------------------------------------------ no server
def test_importing_illava_and_the_cli_does_not_import_gradio():
    code = "import sys, illava, illava.tools.cli, illava.tools.serve; assert 'gradio' not in sys.modules, 'gradio'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_serve_without_gradio_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error:") and 'pip install "illava[demo]"' in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, host, share, warned",
    [
        ([], "127.0.0.1", False, ()),
        (["--port", "8123"], "127.0.0.1", False, ()),
        (["--share"], "127.0.0.1", True, ("public gradio.live link",)),
        (["--host", "0.0.0.0"], "0.0.0.0", False, ("not on 127.0.0.1",)),
        (["--host", "::1"], "::1", False, ()),
    ],
)
def test_serve_command_binds_loopback_unless_told_and_warns(monkeypatch, args, host, share, warned):
    calls = []
    monkeypatch.setattr(web, "build_app", lambda model, device: ("page", model, device))
    monkeypatch.setattr(web, "launch_app", lambda demo, **kw: calls.append((demo, kw)))
    result = CliRunner().invoke(app, ["serve", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert calls == [(("page", None, "cpu"), {"host": host, "port": 8123 if "8123" in args else 7860, "share": share})]
    assert ("warning:" in result.output) == bool(warned), result.output
    for text in warned:
        assert text in result.output, result.output


def test_security_warnings():
    assert web.security_warnings("127.0.0.1", False) == []
    assert web.security_warnings("localhost", False) == []
    assert len(web.security_warnings("0.0.0.0", False)) == 1
    assert len(web.security_warnings("192.168.1.5", True)) == 2
    assert "anyone with the link" in web.security_warnings("127.0.0.1", True)[0]


def test_read_media_images_videos_and_bad_uploads(tmp_path):
    png = tmp_path / "shape.png"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(png)
    media = web.read_media(png)
    assert (media.kind, len(media.frames), media.frames[0].size) == ("image", 1, (64, 48))

    media = web.read_media(write_gif(tmp_path / "clip.gif", 20), frames=8)
    assert (media.kind, len(media.frames), media.total_frames) == ("video", 8, 20)
    assert media.frames[0].tobytes() != media.frames[-1].tobytes()  # spread over the clip, not one frame

    import av

    mp4 = tmp_path / "clip.mp4"
    with av.open(str(mp4), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(12):
            frame = np.full((64, 64, 3), 20 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    media = web.read_media(mp4, frames=4)
    assert (media.kind, len(media.frames), media.total_frames, media.frames[0].size) == ("video", 4, 12, (64, 64))
    means = [np.asarray(f).mean() for f in media.frames]
    assert means == sorted(means) and means[-1] - means[0] > 100  # first to last frame, in order

    bad = {
        "empty.png": (b"", "is empty (0 bytes)"),
        "garbage.png": (b"this is not a png", "garbage.png is not an image or a video"),
        "notes.txt": (b"hello", "notes.txt is not an image or a video"),
        "broken.mp4": (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40, "broken.mp4 cannot be read as a video"),
        "cut.png": (png.read_bytes()[:60], "cut.png is not an image or a video"),
    }
    for name, (data, message) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(web.MediaError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
            web.read_media(tmp_path / name)
        assert str(tmp_path) not in str(caught.value)  # the server's path is not shown
    with pytest.raises(web.MediaError, match="upload one or pick a bundled example"):
        web.read_media(None)


def test_page_fields_round_trip_to_every_preset(direct):
    model = direct[0]
    for preset in illava.PRESETS:
        f = web.fields_for(model, preset)
        config = web.config_from_fields(
            model, preset, f.encoder_layers, f.encoder_removal, f.llm_layers, f.llm_keep_ratio, f.recycle
        )
        assert config == illava.configure(model, preset), preset
    f = web.fields_for(model, "image")
    assert (f.encoder_layers, f.encoder_removal, f.llm_layers, f.removal_kind) == ("1,2,3,4", 25, "1", "count")
    with pytest.raises(ValueError, match="layer numbers separated by commas"):
        web.config_from_fields(model, "image", "1,x", 25, "1", 0.7, "rank")
    with pytest.raises(ValueError, match="encoder_layers"):  # the library's message: the layer's range
        web.config_from_fields(model, "image", "1,2,9", 25, "1", 0.7, "rank")
    with pytest.raises(ValueError, match="token count"):
        web.config_from_fields(model, "image", "1,2", 2.5, "1", 0.7, "rank")


# ------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server():
    """The page on a free loopback port, in this process (a thread); closed at the end."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for key in ("NO_PROXY", "no_proxy"):
        os.environ[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1", "localhost"]))
    port = free_port()
    demo = web.launch(port=port, block=False, quiet=True, model=web.SHIPPED)  # the small model: fast, exact counts
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    c = Client(server[1], verbose=False)
    yield c
    if hasattr(c, "close"):
        c.close()


def compare(client, path, question, **kw):
    from gradio_client import handle_file

    args = {
        "name": web.SHIPPED,
        "path": handle_file(str(path)),
        "question": question,
        "mode": web.MODES[0],
        "preset": "image",
        "enc_layers": "1,2,3,4",
        "enc_removal": 25,
        "llm_layers": "1",
        "keep": 0.7,
        "recycle": "rank",
        "method": "illava",
        "solve_budget": True,
        "budget": 0.5,
        "new_tokens": NEW_TOKENS,
        "repeats": 1,
        "frames": 8,
    }
    args.update(kw)
    return client.predict(*args.values(), api_name="/compare")


def test_server_listens_on_loopback_only(server):
    demo, url = server
    assert demo.server_name == "127.0.0.1" and url.startswith("http://127.0.0.1:")
    assert not demo.share and demo.share_url is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # this machine's outward address, if any
        try:
            probe.connect(("10.255.255.255", 1))
            outward = probe.getsockname()[0]
        except OSError:
            outward = None
    if outward and not outward.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((outward, demo.server_port), timeout=2).close()


def test_client_answers_and_tokens_equal_the_library(client, direct):
    model, tokenizer, processor = direct
    path, question, _ = web.example_rows()[0]
    # the page's fields come from the preset, as when the page opens
    layers, removal, llm_layers, keep, recycle = client.predict(web.SHIPPED, "image", api_name="/preset_fields")
    removal = removal["value"] if isinstance(removal, dict) else removal
    stock, merged, summary, overview, gallery, details = compare(
        client, path, question, enc_layers=layers, enc_removal=removal, llm_layers=llm_layers, keep=keep,
        recycle=recycle,
    )  # fmt: skip

    image = Image.open(path).convert("RGB")
    inputs = build(model.config, tokenizer, [easy_vqa.prompt(question)], [image], image_processor=processor)
    want = library_run(model, tokenizer, inputs, "image")
    assert (stock, merged) == (want["stock"]["answer"], want["illava"]["answer"]) == ("triangle", "triangle")
    for side in ("stock", "illava"):
        assert details[side]["answer"] == want[side]["answer"]
        assert details[side]["visual_tokens"] == want[side]["visual_tokens"]
        assert details[side]["gflops"]["total"] == pytest.approx(want[side]["gflops"], rel=1e-9)
    assert want["illava"]["visual_tokens"] == {"stock": 406, "after_encoder": 206, "after_llm": 144}
    assert details["flops_share"] == pytest.approx(want["illava"]["gflops"] / want["stock"]["gflops"])
    assert details["config"] == str(illava.configure(model, "image"))
    assert details["stock"]["prefill_ms"] > 0 and details["illava"]["prefill_ms"] > 0
    assert "46.4% of stock prefill FLOPs" in summary and "| triangle |" in summary

    # the pictures are those of `illava viz` on the same input, pixel for pixel
    assert [item["caption"] for item in gallery] == list(want["pictures"]) == details["pictures"]
    for item, (name, picture) in zip(gallery, want["pictures"].items()):
        assert np.array_equal(np.asarray(Image.open(item["image"]).convert("RGB")), np.asarray(picture)), name
    assert Image.open(overview).height > max(p.height for p in want["pictures"].values())


def test_client_video_and_method_budget(client, direct):
    model, tokenizer, processor = direct
    path, question, _ = web.example_rows()[-1]
    assert path.endswith(".gif")
    stock, merged, _, _, gallery, details = compare(client, path, question, preset="video")
    frames = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(path))]
    prompt = f"<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n"
    inputs = build(model.config, tokenizer, [prompt], [], [frames], image_processor=processor)
    want = library_run(model, tokenizer, inputs, "video")
    assert details["kind"] == "video" and len(frames) == 8
    assert (stock, merged) == (want["stock"]["answer"], want["illava"]["answer"])
    assert details["illava"]["visual_tokens"] == want["illava"]["visual_tokens"]
    assert details["stock"]["visual_tokens"]["stock"] == 8 * 7 * 7 + 1  # 8 frames pooled to 7x7, + newline
    assert [item["caption"] for item in gallery] == list(want["pictures"])

    # method + FLOPs budget: the knob the library solves, the tokens it gives
    from illava.tools.budget import solve

    path, question, _ = web.example_rows()[0]
    _, merged, summary, _, _, details = compare(client, path, question, mode=web.MODES[1], method="tome", budget=0.5)
    image = Image.open(path).convert("RGB")
    inputs = build(model.config, tokenizer, [easy_vqa.prompt(question)], [image], image_processor=processor)
    solved = solve(model, "tome", 0.5, inputs)
    assert details["notes"]["knob"] == solved.knob and details["notes"]["budget_reached"] is solved.reached is True
    assert details["illava"]["visual_tokens"] == solved.tokens
    assert details["flops_share"] == pytest.approx(solved.share) and solved.share <= 0.5
    assert details["config"] == str(solved.config) and "tome (50% FLOPs budget)" in summary


def test_client_bad_uploads_give_a_readable_message(client, tmp_path):
    from gradio_client.exceptions import AppError

    cases = {
        "garbage.png": (b"definitely not a png", "garbage.png is not an image or a video that can be read"),
        "empty.jpg": (b"", "empty.jpg is empty (0 bytes)"),
        "notes.txt": (b"hello", "notes.txt is not an image or a video"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AppError) as caught:
            compare(client, tmp_path / name, "what is the red shape?")
        text = str(caught.value)
        assert message in text and "Traceback" not in text and "/tmp/gradio" not in text, text
    path, _, _ = web.example_rows()[0]
    with pytest.raises(AppError, match="encoder_layers"):  # a bad field: the library's message, readable
        compare(client, path, "what is the red shape?", enc_layers="1,2,9")


def test_client_model_from_a_local_folder_and_a_bad_model(client, direct, tmp_path):
    """Any supported local folder: here the shipped model saved again (loaded through the generic path:
    AutoModelForImageTextToText + tokenizer + image processor, chatml prompt)."""
    from gradio_client.exceptions import AppError

    model, tokenizer, processor = direct
    folder = tmp_path / "copy"
    for part in (model, tokenizer, processor):
        part.save_pretrained(folder)
    *fields, info = client.predict(str(folder), "image", api_name="/model")
    assert str(folder) in info and "LlavaOnevisionForConditionalGeneration" in info, info
    assert fields[0] == "1,2,3,4" and fields[2] == "1"
    path, question, _ = web.example_rows()[0]
    stock, merged, _, _, _, details = compare(client, path, question, name=str(folder))
    assert (stock, merged) == ("triangle", "triangle") and details["model"] == str(folder)
    assert details["illava"]["visual_tokens"] == {"stock": 406, "after_encoder": 206, "after_llm": 144}
    with pytest.raises(AppError, match="is neither a folder nor a hub id"):
        client.predict("no-such-model", "image", api_name="/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AppError, match="cannot use model .*empty"):
        client.predict(str(tmp_path / "empty"), "image", api_name="/model")


def test_illava_serve_command_serves_the_page_on_loopback():
    """The real command in a subprocess: it prints where the page is and serves it with the default
    model, the real-weights LLaVA (as `illava`'s demo); stopped at the end."""
    import urllib.request

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "COLUMNS": "200", "NO_PROXY": "127.0.0.1,localhost"}
    process = subprocess.Popen(
        [sys.executable, "-m", "illava.tools.cli", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 300  # the real-weights model loads in ~20 s alone
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Running on local URL" in line:
                break
        output = "".join(lines)
        assert f"illava serve: starting the page at http://localhost:{port}/" in output, output
        assert f"http://127.0.0.1:{port}" in output and "warning" not in output.lower(), output
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            page = response.read().decode()
            assert response.status == 200 and "illava: stock vs iLLaVA" in page
            assert web.REAL in page and "SmolLM2-135M" in page, page[:2000]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------ the browser
@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"headless Chromium test needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1700",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_in_headless_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def value(elem_id: str) -> str:
        boxes = browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
        return boxes[0].get_attribute("value") if boxes else ""

    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    browser.get(server[1])
    example = wait.until(
        lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "#illava-examples button") if b.text == "red triangle"]
    )[0]
    example.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#illava-preview img"))
    assert value("illava-question") == "what is the red shape?"
    assert "easy-vqa-test-0.png, 64x64" in browser.find_element(By.ID, "illava-media-info").text
    browser.find_element(By.ID, "illava-run").click()
    start = time.perf_counter()
    wait.until(lambda d: value("illava-answer-illava"))
    assert value("illava-answer-stock") == "triangle" and value("illava-answer-illava") == "triangle"
    summary = browser.find_element(By.ID, "illava-summary").text
    assert "406 → 206 → 144" in summary and "of stock prefill FLOPs" in summary, summary

    def loaded(selector: str):
        images = browser.find_elements(By.CSS_SELECTOR, selector)
        sizes = [int(i.get_attribute("naturalWidth") or 0) for i in images]
        return images if images and sizes[0] > 0 else False

    overview = wait.until(lambda d: loaded("#illava-overview img"))
    size = [int(overview[0].get_attribute(k)) for k in ("naturalWidth", "naturalHeight")]
    assert size[0] > 600 and size[1] > 350, size  # input, first scores, last encoder layer, LLM layer: 2x2
    pictures = wait.until(lambda d: loaded("#illava-pictures img"))
    captions = browser.find_element(By.ID, "illava-pictures").text
    assert len(pictures) >= 10 and "encoder layer 4" in captions and "LLM layer 1" in captions, captions
    time.sleep(0.5)  # let the last images paint
    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] >= 1000
    if os.environ.get("ILLAVA_SERVE_SCREENSHOT"):  # how docs/figures/serve.png is made
        shutil.copy(shot, os.environ["ILLAVA_SERVE_SCREENSHOT"])
    print(f"page answered in {time.perf_counter() - start:.1f} s; screenshot {shot}")

    # a bad upload: a readable line in the page, no stack trace
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    browser.find_element(By.CSS_SELECTOR, "#illava-media button[aria-label=Clear]").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#illava-media input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#illava-media input[type=file]").send_keys(str(bad))
    wait.until(lambda d: "broken.png is not an image" in d.find_element(By.ID, "illava-media-info").text)
    browser.find_element(By.ID, "illava-run").click()
    wait.until(lambda d: "broken.png is not an image or a video that can be read" in d.page_source)
    assert "Traceback" not in browser.page_source


def test_the_page_compares_on_the_default_real_weights_model():
    """The page's default model is the demo's (issue 35): the real-weights LLaVA answers the
    default easy-VQA question with stock and with iLLaVA, tokens per stage as the library counts them."""
    from illava.tools.demo import default_example

    loaded = web.load_model()
    assert loaded.name == web.REAL and "SmolLM2-135M" in web.describe(loaded)
    image, question, answer = default_example()
    result = web.compare(loaded, web.Media("image", [image], "q0"), question, repeats=1, pictures=False).as_dict()
    assert result["model"] == web.REAL
    assert result["stock"]["answer"].startswith(answer), result["stock"]
    assert result["stock"]["visual_tokens"]["after_llm"] == 256
    assert result["illava"]["visual_tokens"]["after_llm"] < 128
