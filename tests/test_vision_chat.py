"""Images through the chat path of Apertus 1.5: sessions, the engine, `generate`, saved chats.

The checkpoint is test_vision.py's tiny full `Apertus1p5ForConditionalGeneration` (its vision tokenizer shrinks each
side 16x), with templates/apertus1p5_rules.jinja as its chat template. Expected prompt ids come from transformers'
`Apertus1p5Processor` (placeholder expansion) and the reference model's own image tokens.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Apertus1p5Processor, GenerationConfig
from transformers.feature_extraction_utils import FeatureExtractionMixin

import apertus_mlx
from apertus_mlx import ApertusError, ChatSession, Done, Engine, SamplingOptions
from apertus_mlx.load import DEMO_MODEL
from apertus_mlx.vision import ImageError, ImageTokenizer

from test_vision import SIZE, ReferenceImageProcessor, make_reference, picture, png_bytes, save_tokenizer

TEMPLATE = (Path(__file__).resolve().parent / "templates" / "apertus1p5_rules.jinja").read_text()


def save_chat_checkpoint(path: Path):
    """test_vision's reference, with a chat template and an end-of-turn eos: (reference, path, processor)."""
    ref = make_reference(seed=3)
    ref.save_pretrained(path)
    tokenizer = save_tokenizer(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=[2]).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": SIZE, "spatial_factor": 16}}))
    processor = Apertus1p5Processor(
        image_processor=ReferenceImageProcessor(size=SIZE),
        feature_extractor=FeatureExtractionMixin(),
        tokenizer=tokenizer,
        chat_template=TEMPLATE,
    )
    return ref, path, processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_chat_checkpoint(tmp_path_factory.mktemp("vision-chat") / "ckpt")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    _, path, _ = checkpoint
    return apertus_mlx.load(path)


class Counting:
    """Counts the vision tokenizer's runs (wraps `ImageTokenizer.model`)."""

    def __init__(self, images: ImageTokenizer):
        self.images, self.model, self.calls = images, images.model, 0
        images._model = self

    def __call__(self, pixels):
        self.calls += 1
        return self.model(pixels)

    def restore(self):
        self.images._model = self.model


def reference_prompt(ref, processor, text: str, images: list[Image.Image]) -> list[int]:
    """The processor's expansion of `text` with the reference model's own image tokens in the placeholders."""
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    ids = inputs["input_ids"][0].clone()
    if images:
        with torch.no_grad():
            visual = ref.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
        ids[ids == ref.config.image_token_id] = torch.cat(visual)
    return ids.tolist()


def test_a_chat_turn_with_images_then_one_without(checkpoint, loaded, tmp_path):
    ref, _, processor = checkpoint
    model, tokenizer = loaded
    first, second = picture(37, 53, seed=1), picture(120, 90, seed=2)
    file = tmp_path / "first.png"
    file.write_bytes(png_bytes(first))
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=4, temperature=0))
    counter = Counting(session.image_tokenizer())
    try:
        events = list(session.stream("What is in these?", images=[file, second]))
        assert counter.calls == 2
        done = events[-1]
        assert isinstance(done, Done) and done.stats.generated_tokens > 0

        # The history holds OpenAI-style parts with self-contained data: URLs, images before the text.
        user = session.messages[0]
        assert [p["type"] for p in user["content"]] == ["image_url", "image_url", "text"]
        url = user["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",")[1]) == file.read_bytes()

        # The template is the reference processor's: its rendering of transformers' image parts, then its expansion.
        text = session.format.render_text(session.messages[:1], system=session.system)
        parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is in these?"}]
        conversation = [{"role": "user", "content": parts}]
        expected_text = processor.apply_chat_template(
            [{"role": "system", "content": session.system}, *conversation], add_generation_prompt=True, tokenize=False
        )
        assert text == expected_text
        prompt = reference_prompt(ref, processor, text, [first, second])
        assert session.render(session.messages[:1]) == prompt
        assert done.stats.prompt_tokens == len(prompt)

        # Turn 2: no image encoded again (the chat keeps its images' codes), and only the new tokens are read.
        session.image_tokenizer()._cache.clear()
        *_, done2 = session.stream("And now?")
        assert counter.calls == 2
        assert done2.stats.prefilled_tokens < done2.stats.prompt_tokens - len(prompt) + 4
        full = session.render()
        assert full[: len(prompt)] == prompt

        # Saved and restored: the same prompt, and still no encoding.
        saved = session.save(tmp_path / "chat.safetensors")
        restored = ChatSession.restore(saved, model, tokenizer)
        session.image_tokenizer()._cache.clear()
        assert restored.render() == full
        assert restored.cached_tokens == session.cached_tokens
        assert counter.calls == 2
    finally:
        counter.restore()


def test_generate_with_images_matches_a_chat(loaded):
    model, tokenizer = loaded
    image = picture(40, 40, seed=5)
    answer = apertus_mlx.generate(model, tokenizer, "Describe it.", images=[image], max_tokens=5, temperature=0)
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=5, temperature=0))
    assert answer == session.generate("Describe it.", images=[png_bytes(image)])
    assert isinstance(answer, str)

    # With deliberation on, only the developer block differs: the image's ids are the same.
    thinking = ChatSession(model, tokenizer, think=True)
    plain, deliberate = session.render(session.messages[:1]), thinking.render(session.messages[:1])
    assert "Deliberation: enabled" in tokenizer.decode(deliberate)
    visual = [i for i in plain if i >= 384]
    assert visual and visual == [i for i in deliberate if i >= 384]


def test_engine_streams_images_sync_and_async(checkpoint, tmp_path, monkeypatch):
    import asyncio
    import threading

    _, path, _ = checkpoint
    image = tmp_path / "picture.png"
    image.write_bytes(png_bytes(picture(33, 47, seed=6)))
    threads = []
    codes = ImageTokenizer.codes

    def recording(self, source):
        threads.append(threading.current_thread().name)
        return codes(self, source)

    monkeypatch.setattr(ImageTokenizer, "codes", recording)
    engine = Engine(str(path)).wait_ready()
    try:
        options = SamplingOptions(max_tokens=4, temperature=0)
        a, b = engine.session(options=options), engine.session(options=options)
        *_, done = engine.stream(a, "What is it?", images=[image])

        async def run():
            return [event async for event in engine.astream(b, "What is it?", images=[str(image)])]

        events = asyncio.run(run())
        assert events[-1].tokens == done.tokens and events[-1].stats.prompt_tokens == done.stats.prompt_tokens
        assert a.messages == b.messages
        assert threads == ["apertus-mlx"]  # encoded once, on the engine's MLX thread
        *_, done = engine.stream(a, "And now?")  # nothing left to encode: no job for the engine thread
        assert threads == ["apertus-mlx"] and done.stats.prefilled_tokens < done.stats.prompt_tokens / 2
        with pytest.raises(ImageError, match=r"no such file"):
            engine.stream(a, "And this?", images=[tmp_path / "missing.png"])
        assert len(a.messages) == 4  # refused before the turn: the chat is as it was
    finally:
        engine.close()


def test_a_template_that_reads_only_strings_gets_the_placeholder_in_the_text(checkpoint, loaded):
    _, path, _ = checkpoint
    model, tokenizer = loaded
    strings_only = apertus_mlx.load_tokenizer(path)
    strings_only._tokenizer.chat_template = TEMPLATE.replace("content is iterable", "false")
    image = picture(40, 56, seed=12)
    parts = ChatSession(model, tokenizer)
    inline = ChatSession(model, strings_only)
    message = parts.user_message("What is it?", [image])
    assert parts.format.image_parts and not inline.format.image_parts
    assert inline.render([message]) == parts.render([message])
    with pytest.raises(ApertusError, match=r"rendered by ChatSession.render"):
        parts.format.render([message])


def test_refusals_are_one_line(checkpoint, loaded, tmp_path):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    with pytest.raises(ImageError, match=r"http\(s\) URLs are not fetched"):
        session.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    with pytest.raises(ApertusError, match=r"only read in a user message"):
        session.render([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])
    with pytest.raises(ImageError, match=r"not an image file"):
        session.stream("What?", images=[b"not a picture"])
    assert session.messages == []

    # A text-only 1.5 checkpoint has no vision tokenizer: refused in one line naming it.
    _, path, _ = checkpoint
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    config = json.loads((path / "config.json").read_text())
    text = {**config["text_config"], "model_type": "apertus1p5_text"}
    (text_only / "config.json").write_text(json.dumps(text))
    import mlx.core as mx

    weights = mx.load(str(path / "model.safetensors"))
    renamed = {k.replace("model.language_model.", "model."): v for k, v in weights.items() if "_tokenizer." not in k}
    mx.save_safetensors(str(text_only / "model.safetensors"), renamed)
    other = apertus_mlx.load_model(text_only)
    session = ChatSession(other, tokenizer)
    with pytest.raises(ApertusError) as e:
        session.stream("What?", images=[picture(32, 32, seed=0)])
    assert str(e.value) == (
        "model 'text-only' (model_type 'apertus1p5_text') cannot read images: it has no vision tokenizer "
        "(images need a full Apertus 1.5 checkpoint, model_type 'apertus1p5')"
    )
    assert session.messages == []


def test_the_cli_reads_images(checkpoint, loaded, tmp_path):
    import subprocess
    import sys

    _, path, _ = checkpoint
    model, tokenizer = loaded
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(png_bytes(picture(37, 53, seed=8)))
    second.write_bytes(png_bytes(picture(64, 48, seed=9)))

    def cli(*args):
        command = [sys.executable, "-m", "apertus_mlx.generate", "--model", str(path), *args]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )

    result = cli("--prompt", "What is it?", "--image", str(first), "--image", str(second), "--temp", "0", "-m", "4")
    assert result.returncode == 0, result.stderr
    expected = apertus_mlx.generate(
        model, tokenizer, "What is it?", images=[first, second], max_tokens=4, temperature=0
    )
    assert result.stdout == expected + "\n"

    missing = tmp_path / "missing.png"
    result = cli("--prompt", "What is it?", "--image", str(missing))
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: image {missing}: no such file\n")

    # Apertus 1 (the demo model) has no vision tokenizer: one line naming it.
    result = cli("--prompt", "What is it?", "--image", str(first), "--model", str(DEMO_MODEL))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"error: model {DEMO_MODEL.name!r} (model_type 'apertus') cannot read images: it has no vision tokenizer "
        "(images need a full Apertus 1.5 checkpoint, model_type 'apertus1p5')\n"
    )


def test_the_server_reads_image_url_parts(checkpoint, loaded, tmp_path):
    import httpx
    import openai

    from apertus_mlx.serve.http import ServerConfig

    from http_server import RunningServer

    _, path, _ = checkpoint
    image = png_bytes(picture(45, 70, seed=10))
    file = tmp_path / "picture.png"
    file.write_bytes(image)
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    server = RunningServer(Engine(str(path)).wait_ready(), ServerConfig())
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        parts = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": data_url}}]
        messages = [{"role": "user", "content": parts}]
        answer = client.chat.completions.create(model="ckpt", messages=messages, max_tokens=4, temperature=0)
        # The Python API with the same message: the same answer.
        assert answer.choices[0].message.content == _answer(*loaded, messages)
        assert answer.usage.prompt_tokens > 20

        # The conversation resent, streamed: the image's tokens come from the cache.
        follow = [*messages, {"role": "assistant", "content": answer.choices[0].message.content}]
        follow.append({"role": "user", "content": "And?"})
        stream = client.chat.completions.create(
            model="ckpt",
            messages=follow,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = list(stream)[-1].usage
        assert usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens - 1

        # The same image as a local file: the same answer.
        for url in (f"file://{file}", str(file)):
            by_file = [{"role": "user", "content": [parts[0], {"type": "image_url", "image_url": {"url": url}}]}]
            again = client.chat.completions.create(model="ckpt", messages=by_file, max_tokens=4, temperature=0)
            assert again.choices[0].message.content == answer.choices[0].message.content

        def post(content):
            body = {"messages": [{"role": "user", "content": content}]}
            return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)

        refusals = [
            ("https://example.com/a.png", "http(s) URLs are not fetched"),
            ("relative/a.png", "expected a data: URL (base64), a file:// URL or an absolute file path"),
            (str(tmp_path / "missing.png"), "no such file"),
            ("data:image/png;base64,bm90IGFuIGltYWdl", "not an image (12 bytes of an unknown format)"),
            ("data:image/png;base64,@@@", "the base64 data is corrupt"),
            ("data:text/plain,hello", "only base64 data: URLs are supported"),
        ]
        for url, message in refusals:
            r = post([{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": url}}])
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "messages[0].content[1].image_url.url", error
            assert message in error["message"] and "\n" not in error["message"]
        r = post([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].type"
    finally:
        server.stop()


def _answer(model, tokenizer, messages) -> str:
    """What the Python API answers to `messages` (the server continues a chat that holds them)."""
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=4, temperature=0))
    session.messages = list(messages)
    *_, done = session.stream()
    return done.answer


def test_greedy_answers_with_an_image_match_transformers_generate(checkpoint, loaded):
    """Token for token: our greedy turn with an image against the reference's own `generate` on the same prompt."""
    ref, _, processor = checkpoint
    model, tokenizer = loaded
    image, new_tokens = picture(48, 72, seed=13), 8
    session = ChatSession(model, tokenizer, options=SamplingOptions(max_tokens=new_tokens, temperature=0))
    *_, done = session.stream("What is in the picture?", images=[image])

    text = session.format.render_text(session.messages[:1], system=session.system)
    inputs = processor(text=text, images=[image], return_tensors="pt")
    assert session.render(session.messages[:1]) == reference_prompt(ref, processor, text, [image])
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=2, pad_token_id=3)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    if expected[-1:] == [2]:  # the reference keeps the end-of-turn token; a chat's answer ends before it
        expected = expected[:-1]
    assert len(expected) >= 2 and list(done.tokens) == expected, (done.tokens, expected)
