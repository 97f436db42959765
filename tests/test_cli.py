"""`python -m apertus_mlx.generate` end to end, in a subprocess as a user runs it."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import apertus_mlx
from apertus_mlx import ChatSession, SamplingOptions
from apertus_mlx.load import DEMO_MODEL

from checkpoints import make_reference, save_reference, short_context, silence_special_tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = silence_special_tokens(make_reference(seed=4, hidden=128, intermediate=256))
    return save_reference(model, tmp_path_factory.mktemp("cli") / "ckpt")


def cli_env(env: dict | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "APERTUS_MODEL"}
    return {**base, "HF_HUB_OFFLINE": "1", **(env or {})}


def cli(*args: str, stdin: str | None = None, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = cli_env(env)
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
        (["--prompt", "Hi", "--repetition-penalty", "-1"], "error: repetition_penalty must be > 0, got -1.0"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(checkpoint, args, message):
    if "--model" not in args:
        args = ["--model", str(checkpoint), *args]
    result = cli(*args)
    assert result.returncode == 1
    assert result.stderr.strip() == message
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--kv-bits", "4", "--kv-group-size", "32", "--max-kv-size", "256"], ["kv_bits", "max_kv_size"]),
        (["--max-kv-size", "2"], ["max_kv_size"]),
        (["--num-draft-tokens", "0"], ["num_draft_tokens"]),
        (["--num-draft-tokens", "0", "--draft-model", "SELF"], ["num_draft_tokens"]),
        (["--repetition-penalty", "0"], ["repetition_penalty"]),
    ],
)
def test_option_errors_are_one_line_naming_the_option(checkpoint, args, names):
    args = [str(checkpoint) if a == "SELF" else a for a in args]
    result = cli("--model", str(checkpoint), "--prompt", "Hi", "--max-tokens", "4", *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(name in result.stderr for name in names), result.stderr
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


def test_ctrl_c_cancels_the_turn_and_exits_130(checkpoint):
    # Special tokens are silenced, so the turn would run for 100000 tokens: it is cut off mid-generation.
    args = ["--model", str(checkpoint), "--prompt", "Hi", "--max-tokens", "100000", "--temp", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "apertus_mlx.generate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert os.read(proc.stdout.fileno(), 1), "the answer never started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in err and "terminate called" not in err


# An Engine whose MLX thread is joined (close) or still generating (no close) when the interpreter exits.
# Without the cleanup of mlx_thread.py about a third of the first kind and all of the second aborted.
ENGINE_EXIT = textwrap.dedent(
    """
    import sys
    from apertus_mlx import Engine
    engine = Engine(sys.argv[1]).wait_ready()
    session = engine.session()
    close = sys.argv[2] == "close"
    events = engine.stream(session, "Hi", max_tokens=8 if close else 100000, temperature=0.8)
    next(events)
    if close:
        list(events)
        engine.close()
    """
)


def engine_exits(checkpoint, runs: int) -> list[str]:
    """Failures among `runs` subprocesses, half closing the engine, half exiting mid-turn; two at a time."""
    failures = []
    for batch in range(0, runs, 2):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", ENGINE_EXIT, str(checkpoint), "close" if i % 2 else "exit"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=cli_env(),
            )
            for i in range(batch, min(batch + 2, runs))
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0 or "terminate called" in err:
                failures.append(f"exit {proc.returncode}: {err[-300:]}")
    return failures


def test_engine_exits_cleanly(checkpoint):
    assert engine_exits(checkpoint, 8) == []


@pytest.mark.slow
def test_engine_exits_cleanly_many_times(checkpoint):
    assert engine_exits(checkpoint, 40) == []


IMPORT_ORDERS = [
    "import apertus_mlx.generate\nimport apertus_mlx",
    "import apertus_mlx\nfunction = apertus_mlx.generate\nimport apertus_mlx.generate",
    "from apertus_mlx.generate import main\nfrom apertus_mlx import generate",
]


@pytest.mark.parametrize("imports", IMPORT_ORDERS)
def test_the_cli_module_does_not_replace_the_generate_function(imports):
    check = (
        "\nimport sys, apertus_mlx.session\n"
        "assert apertus_mlx.generate is apertus_mlx.session.generate, apertus_mlx.generate\n"
        "assert callable(sys.modules['apertus_mlx.generate'].main)\n"
    )
    result = subprocess.run([sys.executable, "-W", "error", "-c", imports + check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_cli_runs_without_a_runpy_warning():
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "apertus_mlx.generate", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("apertus-mlx "), result.stderr
