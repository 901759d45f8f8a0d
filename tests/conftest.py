import os

import pytest
import torch

# no network, no W&B account: every test runs W&B offline unless it says otherwise
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

# The suite's workloads are tiny (2D particles, small nets): one intra-op thread is fastest and deterministic, and
# avoids oversubscription when tests start worker processes (DDP, torch.distributed) on a 2-core machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A fixed-seed CPU generator (every stochastic library function takes one)."""
    return torch.Generator().manual_seed(1234)
