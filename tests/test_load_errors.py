"""Bad input gets one clear line naming the file, key or tensor; the hub path works offline from the cache."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import apertus_mlx
from apertus_mlx import CheckpointError, ConfigError, ModelNotFoundError

from checkpoints import make_reference, save_reference


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return save_reference(make_reference(), tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture
def ckpt(good_checkpoint, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(good_checkpoint, tmp_path / "ckpt")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        apertus_mlx.load(tmp_path / "nowhere")
    assert one_line(e) == f"model path {tmp_path / 'nowhere'} does not exist"


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        apertus_mlx.load_model(tmp_path)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        apertus_mlx.load_model(ckpt)
    assert one_line(e) == f"{ckpt}: no model*.safetensors weight files"


def test_truncated_weights(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        apertus_mlx.load_model(ckpt)
    assert one_line(e).startswith(f"{file}: unreadable safetensors")
    assert "incomplete download or corrupt file" in str(e.value)


def test_missing_shard(ckpt):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        apertus_mlx.load_model(ckpt)
    assert (
        one_line(e) == f"{ckpt}: model-00002-of-00002.safetensors is listed in model.safetensors.index.json but missing"
    )


def test_tensor_with_wrong_shape(ckpt):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = np.zeros((16, 64), dtype=np.float32)
    save_file(tensors, file)
    with pytest.raises(CheckpointError) as e:
        apertus_mlx.load_model(ckpt)
    assert one_line(e) == f"model.safetensors: tensor {name} has shape (16, 64), config.json implies (32, 64)"


def test_missing_tensor(ckpt):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    del tensors["lm_head.weight"]
    save_file(tensors, file)
    with pytest.raises(CheckpointError) as e:
        apertus_mlx.load_model(ckpt)
    assert one_line(e) == "checkpoint lacks tensor lm_head.weight"


def test_missing_config_key(ckpt):
    edit_config(ckpt, hidden_size=None)
    with pytest.raises(ConfigError) as e:
        apertus_mlx.load_model(ckpt)
    assert one_line(e) == "config.json: missing key(s) hidden_size"


def test_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(ConfigError) as e:
        apertus_mlx.load_model(ckpt)
    assert one_line(e) == (
        "config.json: model_type is 'llama', expected one of 'apertus', 'apertus1p5_text', 'apertus1p5'"
    )


def test_unsupported_rope_type(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    edit_config(ckpt, rope_parameters={**config["rope_parameters"], "rope_type": "yarn"})
    with pytest.raises(ConfigError) as e:
        apertus_mlx.load_model(ckpt)
    assert one_line(e) == (
        "config.json: rope_parameters.rope_type 'yarn' is not supported (expected 'llama3' or 'default')"
    )


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        apertus_mlx.load_model(ckpt)


def test_unsupported_quantization_method(ckpt):
    edit_config(ckpt, quantization_config={"quant_method": "awq"})
    with pytest.raises(ConfigError, match=r"quant_method 'awq' is not supported \(GPTQ and NVFP4 are\); use an MLX"):
        apertus_mlx.load_model(ckpt)


def _resolve_offline(name: str, hf_home, cwd) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_HUB_OFFLINE when imported, so run as a user would: a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    code = (
        "import apertus_mlx, sys\n"
        f"try: print(apertus_mlx.resolve({name!r}))\n"
        "except apertus_mlx.ApertusError as e: sys.exit(str(e))"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_repo_id_offline_and_not_cached(tmp_path):
    result = _resolve_offline("swiss-ai/Apertus-8B-Instruct-2509", tmp_path / "hf", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "swiss-ai/Apertus-8B-Instruct-2509 is not a local directory and is not in the Hugging Face cache, "
        "and the hub cannot be reached (offline or HF_HUB_OFFLINE=1); pass a local model directory"
    )


def test_repo_id_offline_from_cache(good_checkpoint, tmp_path):
    # The hub cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hf" / "hub" / "models--swiss-ai--Apertus-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(good_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = _resolve_offline("swiss-ai/Apertus-tiny", tmp_path / "hf", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(repo / "snapshots" / commit)
