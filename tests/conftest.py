import os
import tempfile

import pytest
import torch

# Generated modules go to a per-session cache, never the user's ~/.cache.
os.environ.setdefault("RCC_CACHE_DIR", tempfile.mkdtemp(prefix="rcc-test-cache-"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = os.path.join(ROOT, "stdlib")


def stdlib(name: str) -> str:
    return os.path.join(STDLIB, name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
