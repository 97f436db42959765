"""The README's Python example runs as written (on a test checkpoint instead of the hub model)."""

import re
import subprocess
import sys
from pathlib import Path

from checkpoints import REPO, make_reference, save_reference, silence_special_tokens


def test_python_api_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    checkpoint = save_reference(silence_special_tokens(make_reference(seed=8)), tmp_path / "ckpt")
    assert '"swiss-ai/Apertus-8B-Instruct-2509"' in code
    code = code.replace('"swiss-ai/Apertus-8B-Instruct-2509"', repr(str(checkpoint)))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[(stop|length|tool_calls): [\d.]+ tok/s\]", result.stdout)
    assert Path(tmp_path / "chat.safetensors").is_file()


def test_engine_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Many chats, one model") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    checkpoint = save_reference(silence_special_tokens(make_reference(seed=8)), tmp_path / "ckpt")
    assert '"swiss-ai/Apertus-8B-Instruct-2509"' in code and "engine.close()" in code
    code = code.replace('"swiss-ai/Apertus-8B-Instruct-2509"', repr(str(checkpoint)))
    # Run the asyncio face too, before the engine closes.
    code = code.replace("engine.close()", "import asyncio\nasyncio.run(answer(chat, 'Und?'))\nengine.close()")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Path(tmp_path / "chat.safetensors").is_file()
