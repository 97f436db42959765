"""`python -m apertus_mlx.generate` end to end, in a subprocess as a user runs it."""

import os
import subprocess
import sys

import pytest

import apertus_mlx
from apertus_mlx import ChatSession, SamplingOptions
from apertus_mlx.load import DEMO_MODEL

from checkpoints import make_reference, save_reference, short_context, silence_special_tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = silence_special_tokens(make_reference(seed=4, hidden=128, intermediate=256))
    return save_reference(model, tmp_path_factory.mktemp("cli") / "ckpt")


def cli(*args: str, stdin: str | None = None, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "APERTUS_MODEL"}
    env = {**base, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "apertus_mlx.generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def expected_answer(checkpoint, prompt: str, max_tokens: int) -> str:
    model, tokenizer = apertus_mlx.load(checkpoint)
    options = SamplingOptions(max_tokens=max_tokens, temperature=0)
    return ChatSession(model, tokenizer, options=options).generate(prompt)


def test_streams_the_answer_and_prints_stats(checkpoint):
    result = cli("--model", str(checkpoint), "--prompt", "Grüezi!", "--temp", "0", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_answer(checkpoint, "Grüezi!", 12) + "\n"
    stats = result.stderr.strip().splitlines()[-1]
    assert stats.startswith("prompt: ") and "generation: 12 tokens" in stats and "stopped: length" in stats
    assert "Traceback" not in result.stderr


def test_prompt_from_stdin(checkpoint):
    result = cli("--model", str(checkpoint), "--prompt", "-", "--temp", "0", "--max-tokens", "6", stdin="Grüezi!")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_answer(checkpoint, "Grüezi!", 6) + "\n"


def test_model_from_environment(checkpoint):
    result = cli(
        "--prompt", "Hi", "--temp", "0", "--max-tokens", "4", "--verbose", env={"APERTUS_MODEL": str(checkpoint)}
    )
    assert result.returncode == 0, result.stderr
    assert f"model: {checkpoint}" in result.stderr


def test_sampling_flags_and_speculative_decoding(checkpoint):
    args = ["--model", str(checkpoint), "--prompt", "Hi", "--max-tokens", "10", "--seed", "3", "--top-k", "50"]
    first = cli(*args, "--min-p", "0.05")
    again = cli(*args, "--min-p", "0.05", "--draft-model", str(checkpoint), "--num-draft-tokens", "2")
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "draft accepted:" in again.stderr
    quantized_kv = cli(*args, "--kv-bits", "8", "--kv-group-size", "32")
    assert quantized_kv.returncode == 0, quantized_kv.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model", "--prompt", "Hi"], "error: model path /no/such/model does not exist"),
        (["--prompt", "   "], "error: empty prompt: pass --prompt TEXT (or --prompt - with text on stdin)"),
        (["--prompt", "Hi", "--max-tokens", "0"], "error: max_tokens must be at least 1, got 0"),
        (["--prompt", "Hi", "--max-tokens", "-5"], "error: max_tokens must be at least 1, got -5"),
        (["--prompt", "Hi", "--kv-bits", "8"], "error: kv_group_size 64 does not divide the head dimension 32"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(checkpoint, args, message):
    if "--model" not in args:
        args = ["--model", str(checkpoint), *args]
    result = cli(*args)
    assert result.returncode == 1
    assert result.stderr.strip() == message
    assert result.stdout == ""


def test_prompt_longer_than_context(tmp_path):
    path = save_reference(make_reference(**short_context(64)), tmp_path / "short")
    result = cli("--model", str(path), "--prompt", "word " * 100)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the chat is ")
    assert "longer than the model's 64-token context" in result.stderr and "Traceback" not in result.stderr


def test_no_model_offline_falls_back_to_the_demo_model(tmp_path):
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("the demo model is not in this checkout")
    result = cli("--prompt", "Hello", "--max-tokens", "8", "--temp", "0", env={"HF_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        "note: swiss-ai/Apertus-8B-Instruct-2509 is not available offline; using the bundled demo model"
    )
    assert result.stdout.strip()


def test_think_marks_reasoning_apart_from_the_answer(capsys):
    from apertus_mlx.events import Done, Stats, TextDelta, ToolCall
    from apertus_mlx.generate import _print_turn

    stats = Stats(10, 10, 5, 0.1, 100.0, 50.0, 0.5)
    events = [
        TextDelta("Let me think.", "reasoning"),
        TextDelta("Bern.", "answer"),
        ToolCall("lookup", {"city": "Bern"}),
        Done("tool_calls", stats),
    ]
    assert _print_turn(iter(events), show_reasoning=True) == 0
    out, err = capsys.readouterr()
    assert out == "[reasoning]\nLet me think.\n[answer]\nBern.\n[tool call] lookup({'city': 'Bern'})\n\n"
    assert "generation: 5 tokens, 50.0 tok/s" in err and "stopped: tool_calls" in err
    assert _print_turn(iter(events), show_reasoning=False) == 0
    assert capsys.readouterr().out.startswith("Bern.\n[tool call]")  # reasoning hidden without --think
