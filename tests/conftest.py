import os
import pickle

import numpy as np

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


def write_cifar(folder, n_per_batch=6, seed=0):
    """Write CIFAR-10's python-pickle batches (data_batch_1..5, test_batch, batches.meta) of random images to
    `folder`, in exactly the format of the real download; returns the batches written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n_per_batch).tolist(),
             b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, f)
    return batches
