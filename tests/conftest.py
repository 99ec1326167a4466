import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tests compare against reference code on the CPU in float32; keep results independent of core count noise.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture()
def one_thread():
    """One intra-op thread for the test (torchrun ranks run with OMP_NUM_THREADS=1; small matrices on 2 busy
    cores, where thread hand-offs cost more than the arithmetic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache/config dirs, and no network unless it turns offline mode off."""
    root = tmp_path_factory.mktemp("fd_eval_home")
    monkeypatch.setenv("FD_EVAL_CACHE", str(root / "cache"))
    monkeypatch.setenv("FD_EVAL_CONFIG", str(root / "config"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FD_EVAL_OFFLINE", "1")
    yield root
