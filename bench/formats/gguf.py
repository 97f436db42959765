"""GGUF contenders: the source converted and quantized by llama.cpp's own tools, as llama.cpp users make them.

llama.cpp is not a PyPI tool, but its sources (converter, gguf-py, C++) ship in the llama-cpp-python sdist:
`$LLAMA_CPP` names such a checkout, else this fetches one with pip into the scratch directory. Then:

- BF16 and Q8_0: `convert_hf_to_gguf.py --outtype bf16 / q8_0`, with one override: the converter names a BPE
  tokenizer's split rules by hashing its output and refuses hashes it does not know, as the yardstick models'
  small vocabularies are; their rules are GPT-2's, so it is told `gpt-2`;
- Q4_0, Q5_0, Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K: `llama-quantize` on the BF16 file, built with cmake into the
  checkout when `$LLAMA_QUANTIZE` does not name one (a few minutes on two cores). Without a C++ toolchain
  only the converter's two contenders are made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # vendors ggml-org/llama.cpp@0c1e57098
QUANTS = ["Q4_0", "Q5_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K"]
# Runs llama.cpp's converter with the split rules named (see above); argv follows.
CONVERT = (
    "import sys, runpy, conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'; "
    "sys.argv[0] = 'convert_hf_to_gguf.py'; runpy.run_path('convert_hf_to_gguf.py', run_name='__main__')"
)


def contenders(source: Path, scratch: Path) -> list[tuple[str, Path]]:
    """(label, .gguf file) for each type llama.cpp's tools make here."""
    llama = llama_cpp(scratch)
    made = []
    for outtype in ("bf16", "q8_0"):
        out = scratch / f"source-{outtype.upper()}.gguf"
        _run([sys.executable, "-c", CONVERT, str(source), "--outtype", outtype, "--outfile", str(out)], llama)
        made.append((f"gguf/{outtype.upper()} (convert_hf_to_gguf.py)", out))
    quantize = llama_quantize(llama)
    if quantize is None:
        print("gguf: no C++ toolchain to build llama-quantize; K-quants not made", file=sys.stderr)
        return made
    for quant in QUANTS:
        out = scratch / f"source-{quant}.gguf"
        _run([str(quantize), str(made[0][1]), str(out), quant], llama)
        made.append((f"gguf/{quant} (llama-quantize)", out))
    return made


def llama_cpp(scratch: Path) -> Path:
    """A llama.cpp checkout: `$LLAMA_CPP`, or the one vendored in llama-cpp-python's sdist, fetched by pip."""
    if env := os.environ.get("LLAMA_CPP"):
        return Path(env)
    fetched = scratch / "llama-cpp-python"
    _run([sys.executable, "-m", "pip", "download", LLAMA_CPP_PYTHON, "--no-deps", "--no-binary", ":all:"], fetched)
    with tarfile.open(next(fetched.glob("*.tar.gz"))) as tar:
        tar.extractall(fetched, filter="data")
    return next(fetched.glob("llama_cpp_python-*/vendor/llama.cpp"))


def llama_quantize(llama: Path) -> Path | None:
    """`$LLAMA_QUANTIZE`, a build already in the checkout, or one built now; None without cmake and a compiler."""
    if env := os.environ.get("LLAMA_QUANTIZE"):
        return Path(env)
    binary = llama / "build" / "bin" / "llama-quantize"
    if binary.is_file():
        return binary
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        return None
    off = ["LLAMA_CURL", "LLAMA_OPENSSL", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_EXAMPLES", "LLAMA_BUILD_SERVER"]
    _run(["cmake", "-S", ".", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", *(f"-D{o}=OFF" for o in off)], llama)
    _run(["cmake", "--build", "build", "--target", "llama-quantize", "-j", str(os.cpu_count() or 2)], llama)
    return binary


def _run(command: list[str], cwd: Path) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([".", "gguf-py", os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{Path(command[0]).name} failed in {cwd}: {tail[0]}")
