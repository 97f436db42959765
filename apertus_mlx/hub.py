"""Fetch a model from the Hugging Face hub: the files its format needs, and one GGUF file of several.

`owner/name` downloads what a chat needs from a safetensors repo (MLX, Hugging Face, GPTQ, NVFP4 with its
adapters and quantization configs). A repo of GGUF files gets one file: `owner/name:Q4_K_M` names its quant
type; with no tag, a repo holding a single GGUF file gets that one, and several are refused with their tags.
Offline (`HF_HUB_OFFLINE=1`), the same choice is made among the files the local cache holds.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelNotFoundError
from .progress import ProgressCallback, hub_tqdm

# What a chat needs from a repo; skips the original PyTorch/consolidated files some repos also carry.
# Adapters (EoRA) may sit in a subfolder; `*` in these patterns also matches `/`.
PATTERNS = ["*.json", "model*.safetensors", "*adapter_model.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def download(name: str, revision: str | None = None, progress: ProgressCallback | None = None) -> Path:
    """The local path of hub repo `name` (`owner/repo` or `owner/repo:TAG`): a snapshot directory or a .gguf file."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo, _, tag = name.partition(":")
    bars = {"tqdm_class": hub_tqdm(progress)} if progress else {}
    try:
        files = _listing(repo, revision)
        if files is None:  # offline or unreachable: choose among what the cache holds
            snapshot = Path(snapshot_download(repo, revision=revision, local_files_only=True))
            cached = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
            chosen = _gguf_choice(cached, tag)
            return snapshot / chosen if chosen else snapshot
        if chosen := _gguf_choice(files, tag):
            return Path(hf_hub_download(repo, chosen, revision=revision, **bars))
        return Path(snapshot_download(repo, revision=revision, allow_patterns=PATTERNS, **bars))
    except ModelNotFoundError:  # our own choice of file failed: already one line (and an OSError too)
        raise
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is gated: accept its terms on huggingface.co, then log in here (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo} is neither a local directory nor a Hugging Face repo") from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{name} is not a local directory and is not in the Hugging Face cache, and the hub cannot be "
            "reached (offline or HF_HUB_OFFLINE=1); pass a local model directory"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"cannot download {name} from the Hugging Face hub: {_first_line(e)}") from None


def _listing(repo: str, revision: str | None) -> list[str] | None:
    """The repo's file names, or None when the hub is offline or cannot be reached (the cache decides then)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return HfApi().list_repo_files(repo, revision=revision)
    except RepositoryNotFoundError:  # gated repos too: said as such by the caller
        raise
    except Exception:  # no network, a proxy, a timeout: whatever the transport raises, the cache may still serve
        return None


def _gguf_choice(files: list[str], tag: str) -> str | None:
    """The GGUF file to fetch, or None for a safetensors repo (which a tag cannot apply to)."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    safetensors = any(f.endswith(".safetensors") for f in files)
    if tag and not ggufs:
        raise ModelNotFoundError(f"the tag :{tag} picks a GGUF file, but the repo holds none")
    if not ggufs or (safetensors and not tag):
        return None
    from .formats.gguf import pick

    return pick(ggufs, tag or None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
