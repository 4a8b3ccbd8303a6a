"""What `prepare-data.source` names, pinned: a local file by its sha256, a hub dataset by its revision.

DVC can track only files, and a hub id is none: the `resolve-source` stage (always run: hashing the
file takes well under a second, the stage's imports a few) writes this identity to `data/source.json`,
which prepare-data depends on instead of the source itself. So prepare-data reruns exactly when what
it reads changed (an edited file, a new hub revision), whatever `prepare-data.source` names, and then
reads that revision.
"""
import json
import os
from pathlib import Path

from .data import is_local
from .io import DataFileError, file_digest
from .params import ConfigError

HUB_TIMEOUT_S = 10
KEY = "prepare-data.source"


def source_identity(source: str) -> dict[str, str | int]:
    """{"source", "sha256", "bytes"} of a local .jsonl, or {"source", "revision"} of a hub dataset."""
    if is_local(source):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{KEY}: no such file {source!r} (relative to {os.getcwd()})")
        return {"source": source, "sha256": file_digest(path), "bytes": path.stat().st_size}
    return {"source": source, "revision": _hub_revision(source)}


def _hub_revision(source: str) -> str:
    import huggingface_hub  # only for hub ids
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    where = f"{KEY}: {source!r} is neither a .jsonl file nor"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{where} reachable: the hub is offline (HF_HUB_OFFLINE), so its revision is unknown")
    try:
        return huggingface_hub.dataset_info(source, timeout=HUB_TIMEOUT_S).sha
    except HFValidationError:
        raise ConfigError(f"{where} a valid hub dataset id") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where} a dataset on the hub (or it is private or gated)") from None
    except Exception as e:  # the hub client's transport errors (httpx) vary by version
        raise ConfigError(f"{where} reachable on the hub ({type(e).__name__}: {e})") from None


def read_identity(path: str | Path, source: str) -> dict:
    """The pin resolve-source wrote; it must be of the source params name now (outside DVC it can be
    missing or stale)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: missing; run `dvc repro` (its resolve-source stage writes it)")
    identity = json.loads(path.read_text())
    if identity.get("source") != source:
        raise ConfigError(f"{KEY}: {source!r}, but {path} pins {identity.get('source')!r}; "
                          "run `dvc repro` (its resolve-source stage writes it anew)")
    return identity
