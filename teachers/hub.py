"""Public pretrained teachers, fetched once into the user's cache by the owning library's own mechanism.

- **Hugging Face hub** (diffusers models; `teacher=diffusers teacher.hub_id=google/ddpm-cifar10-32`, the cifar10
  recipe's default): `huggingface_hub.hf_hub_download` into the hub cache (`$HF_HOME/hub`, or `HF_HUB_CACHE`), file by
  file: the JSON configs and the `*.safetensors` weights (never a pickle), at the root (as google/ddpm-cifar10-32) or
  in a pipeline's `unet/` + `scheduler/` folders. The hub client checks downloads against the repository's hashes.
- **URL files** (NVlabs/edm network pickles; `teacher=edm_pickle teacher.url=<EDM_CIFAR10[...]>`): torch hub's cache
  folder `<torch.hub.get_dir()>/checkpoints/<file name>` (`$TORCH_HOME/hub/checkpoints`), written through a temporary
  file and a rename (torch.hub's scheme), its sha256 checked when one is given (`teacher.sha256`; NVlabs publishes
  none for these files). Downloading a pickle runs nothing: unpickling it still needs `teacher.allow_pickle=true`.

A cached copy is used without any network access. Otherwise a single connection attempt to the host, bounded by
`timeout` seconds, decides; offline (or `HF_HUB_OFFLINE=1`) the fetch raises `TeacherUnavailableError` at once, naming
the package, the hub id / file, the cache folder where the files belong and the command that puts them there.
Every later request has a timeout too (the hub client's metadata requests `timeout`, its file reads
`HF_HUB_DOWNLOAD_TIMEOUT`; URL reads `timeout`), so a fetch never hangs: before downloading, one metadata request
bounded by `timeout` (without the hub client's retries, which wait minutes) checks that the hub answers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import torch

from fkdiff.files import sha256_file

__all__ = ["TeacherUnavailableError", "DDPM_CIFAR10", "DDPM_CIFAR10_UNET_CONFIG", "EDM_CIFAR10",
           "HUB_LAYOUTS", "hub_cache_dir", "fetch_hub_model", "fetch_url", "url_cache_path"]

DDPM_CIFAR10 = "google/ddpm-cifar10-32"  # Ho et al. 2020's CIFAR-10 model: eps-prediction, linear betas, T = 1000
# its UNet2DModel config (the hub's config.json; 35.7M parameters): the architecture the benchmarks time
DDPM_CIFAR10_UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), act_fn="silu", attention_head_dim=None,
    center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1,
    norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional")
_EDM = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM_CIFAR10 = {  # NVlabs/edm README, "Pre-trained models" (config F); class-conditional ones take 10 labels
    "cond-vp": _EDM + "edm-cifar10-32x32-cond-vp.pkl",
    "cond-ve": _EDM + "edm-cifar10-32x32-cond-ve.pkl",
    "uncond-vp": _EDM + "edm-cifar10-32x32-uncond-vp.pkl",
    "uncond-ve": _EDM + "edm-cifar10-32x32-uncond-ve.pkl",
}


class TeacherUnavailableError(FileNotFoundError):
    """A public teacher is neither cached here nor downloadable now (the message says where to put it)."""


def _unreachable(url: str, timeout: float) -> str | None:
    """None if a TCP connection to `url`'s host (or the HTTPS proxy in the environment) opens within `timeout`
    seconds, else the reason."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urllib.parse.urlparse(proxy if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme in ("https", "") else 80)
    if not host:
        return f"no host in {url!r}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot connect to {host}:{port} within {timeout:g} s ({type(e).__name__}: {e})"


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache folder in use (`cache_dir`, else `HF_HUB_CACHE`, else `$HF_HOME/hub`)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# a diffusers UNet2DModel on the hub: flat (google/ddpm-cifar10-32) or a pipeline's unet/ + scheduler/ folders;
# (file, required) in the order fetched
HUB_LAYOUTS = (
    (("config.json", True), ("diffusion_pytorch_model.safetensors", True), ("scheduler_config.json", False)),
    (("unet/config.json", True), ("unet/diffusion_pytorch_model.safetensors", True),
     ("scheduler/scheduler_config.json", False)),
)


def _hub_files(hub_id: str, layout, **kw) -> Path:
    """Fetch (or find cached) every file of `layout` with `hf_hub_download`; returns the snapshot folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    folder = None
    for name, required in layout:
        try:
            path = Path(hf_hub_download(hub_id, name, **kw))
        except LocalEntryNotFoundError:
            raise
        except EntryNotFoundError:  # the hub answered: no such file
            if required:
                raise
            continue
        folder = folder or path.parents[len(Path(name).parts) - 1]
    return folder


def fetch_hub_model(hub_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    timeout: float = 10.0, package: str = "diffusers") -> Path:
    """The local folder of hub model `hub_id` (a diffusers UNet2DModel: configs + safetensors), downloaded into the
    hub cache on first use, file by file with `huggingface_hub.hf_hub_download` (every request bounded by `timeout`).

    Raises `TeacherUnavailableError` (module docstring) when it is not cached and cannot be downloaded now.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:  # huggingface_hub comes with diffusers
        raise ImportError(f"fetching {hub_id} needs the `{package}` package (it brings huggingface_hub): "
                          f"pip install fkdiff[{package}]") from e
    kw = dict(revision=revision, cache_dir=cache_dir, endpoint=constants.ENDPOINT)
    for layout in HUB_LAYOUTS:  # cached: no network at all
        try:
            return _hub_files(hub_id, layout, local_files_only=True, **kw)
        except (LocalEntryNotFoundError, EntryNotFoundError):
            continue
    cache = hub_cache_dir(cache_dir)
    where = (f"On a machine with network run `huggingface-cli download {hub_id} --include '*.json' '*.safetensors'` "
             f"(or python -c \"from huggingface_hub import snapshot_download; snapshot_download('{hub_id}')\") and "
             f"copy its cache folder {cache / ('models--' + hub_id.replace('/', '--'))} into this machine's hub cache "
             f"{cache} (HF_HOME / HF_HUB_CACHE move it), or put the model folder (config.json, "
             f"diffusion_pytorch_model.safetensors, scheduler_config.json) anywhere and pass teacher.path=<folder>.")
    head = f"the public teacher {hub_id} ({package} model, Hugging Face hub) is not in the hub cache {cache}"
    if constants.HF_HUB_OFFLINE:
        raise TeacherUnavailableError(f"{head} and HF_HUB_OFFLINE=1 forbids downloading it. {where}")
    reason = _unreachable(constants.ENDPOINT, timeout)
    if reason is not None:
        raise TeacherUnavailableError(f"{head} and the hub is unreachable: {reason}. {where}")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    missing = []
    for layout in HUB_LAYOUTS:
        first = layout[0][0]
        try:  # one metadata request bounded by `timeout` (the hub client's own retries wait minutes): is it there?
            get_hf_file_metadata(hf_hub_url(hub_id, first, revision=revision, endpoint=constants.ENDPOINT),
                                 timeout=timeout)
        except EntryNotFoundError:  # the hub answered: not this layout
            missing.append(first)
            continue
        except Exception as e:  # no answer in time, connection lost, repository not found, ...
            raise TeacherUnavailableError(f"{head} and asking the hub for {first} failed ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''}). {where}") from e
        try:
            return _hub_files(hub_id, layout, etag_timeout=timeout, **kw)
        except Exception as e:
            raise TeacherUnavailableError(f"{head} and downloading it failed ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''}). {where}") from e
    raise TeacherUnavailableError(f"{head}, and the hub has no diffusers UNet there ({' / '.join(missing)} not "
                                  f"found). {where}")


def url_cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch_url` keeps `url`: `<cache_dir or torch.hub.get_dir()/checkpoints>/<file name>`."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot name a file after the URL {url!r}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / name


def fetch_url(url: str, *, sha256: str | None = None, cache_dir: str | os.PathLike | None = None,
              timeout: float = 10.0, package: str = "NVlabs/edm") -> Path:
    """The cached copy of the file at `url` (module docstring), downloaded on first use; `sha256` (a full hex digest
    or a prefix) is checked on the cached file and on the download."""
    dst = url_cache_path(url, cache_dir)
    want = sha256.lower() if sha256 else None
    if dst.is_file():
        if want is None or sha256_file(dst).startswith(want):
            return dst
        raise ValueError(f"{dst} does not match teacher.sha256={sha256} (got {sha256_file(dst)}); delete it to download "
                         "it again, or fix the checksum")
    where = (f"On a machine with network download {url} and put it at {dst} (TORCH_HOME moves the torch hub cache "
             f"{dst.parent.parent}), or pass teacher.path=<the file>.")
    head = f"the public teacher file {dst.name} ({package}) is not in the torch hub cache {dst.parent}"
    reason = _unreachable(url, timeout)
    if reason is not None:
        raise TeacherUnavailableError(f"{head} and {url} is unreachable: {reason}. {where}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex}.partial")
    h = hashlib.sha256()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})
        with urllib.request.urlopen(req, timeout=timeout) as u, open(tmp, "wb") as f:
            for chunk in iter(lambda: u.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
        if want is not None and not h.hexdigest().startswith(want):
            raise ValueError(f"{url}: sha256 {h.hexdigest()} does not match teacher.sha256={sha256}")
        shutil.move(str(tmp), str(dst))
    except OSError as e:
        raise TeacherUnavailableError(f"{head} and downloading it failed ({type(e).__name__}: {e}). {where}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dst
