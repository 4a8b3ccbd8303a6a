"""Suite-wide setup: offline, telemetry off, Triton in interpreter mode before any kernel is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stories_path() -> Path:
    assert STORIES.is_dir(), f"tests need ../shared beside the checkout; missing {STORIES}"
    return STORIES


@pytest.fixture(scope="session")
def data(stories_path):
    """Alpaca packed into 6 train and 2 validation chunks of 128 stories260K tokens (the training tests' data)."""
    from pipeline.config import PrepareDataConfig
    from pipeline.data import prepare_alpaca, read_alpaca_rows
    from pipeline.teacher import load_tokenizer

    cfg = PrepareDataConfig(seq_len=128, max_train_tokens=128 * 6, max_val_tokens=128 * 2, val_rows=20)
    rows = read_alpaca_rows(str(SHARED / "data" / "alpaca" / "train.jsonl"))
    return prepare_alpaca(rows, load_tokenizer(str(stories_path)), cfg).dataset
