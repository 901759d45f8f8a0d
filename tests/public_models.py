"""Tiny models of the public teachers' classes, saved in their on-disk formats, and an offline Hugging Face cache
(shared by the tests of teachers.hub, the warm-started student and the cifar10 recipe)."""

from pathlib import Path

import pytest
import torch


def _diffusers():
    import diffusers

    return diffusers


def tiny_unet(num_classes=None, size=32, seed=0):
    """A UNet2DModel of the public CIFAR-10 model's class (attention at the lower resolution), small."""
    torch.manual_seed(seed)
    return _diffusers().UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                                    block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8,
                                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_classes)


def save_ddpm_folder(folder: Path, num_classes=None, size=32, seed=0) -> Path:
    """The flat layout of google/ddpm-cifar10-32 (config.json, diffusion_pytorch_model.safetensors,
    scheduler_config.json), written by diffusers' own save_pretrained."""
    tiny_unet(num_classes, size, seed).save_pretrained(folder)
    _diffusers().DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder)
    return folder


def place_in_hub_cache(cache: Path, hub_id: str, src: Path) -> Path:
    """Put a model folder where huggingface_hub's cache keeps `hub_id` at revision main (refs/main -> snapshot)."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """An empty Hugging Face home with the hub switched off (HF_HUB_OFFLINE=1); huggingface_hub reads these at import,
    so its constants are patched too."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"
