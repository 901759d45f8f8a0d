"""Public teachers (teachers.hub): the hub / URL fetch into the user's cache, the offline errors (immediate, naming the
package, the id / file and where to put it), conditioning and sigma range taken from the teacher, the truncated
training sigma law. The real loading code runs on tiny models of the public models' classes, saved in their format."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fkdiff.diffusion import restrict_normal, sample_training_sigma
from teachers import load_teacher
from teachers.hub import DDPM_CIFAR10, EDM_CIFAR10, TeacherUnavailableError, fetch_hub_model, fetch_url, url_cache_path
from teachers.load import conditioning

ROOT = Path(__file__).resolve().parents[1]
diffusers = pytest.importorskip("diffusers")
from public_models import offline_hf, place_in_hub_cache, save_ddpm_folder  # noqa: E402,F401  (offline_hf: fixture)


# ------------------------------------------------------------------------------------------------- hub fetch


def test_offline_hub_fetch_fails_at_once_naming_package_id_and_cache(offline_hf):
    t0 = time.perf_counter()
    with pytest.raises(TeacherUnavailableError) as err:
        load_teacher({"kind": "diffusers", "hub_id": DDPM_CIFAR10})
    assert time.perf_counter() - t0 < 5.0
    msg = str(err.value)
    for part in ("diffusers", DDPM_CIFAR10, str(offline_hf), "HF_HUB_OFFLINE=1", "teacher.path=<folder>",
                 "huggingface-cli download"):
        assert part in msg, (part, msg)


@pytest.fixture
def silent_server():
    """A local TCP server that accepts connections and never answers (a stalled proxy or endpoint)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    th.join()
    for c in conns:
        c.close()
    srv.close()


@pytest.mark.parametrize("endpoint", ["refused", "silent"])
def test_unreachable_hub_is_a_bounded_wait(tmp_path, monkeypatch, endpoint, silent_server):
    """Not offline by flag, but the endpoint refuses connections or accepts and never answers: the fetch gives up
    within the timeout with the clear error."""
    import socket

    from huggingface_hub import constants

    if endpoint == "refused":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        s.close()  # nothing listens there
    else:
        url = silent_server
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(TeacherUnavailableError) as err:
        fetch_hub_model(DDPM_CIFAR10, cache_dir=tmp_path / "hub", timeout=1.0)
    took = time.perf_counter() - t0
    assert DDPM_CIFAR10 in str(err.value) and "teacher.path=<folder>" in str(err.value)
    if endpoint == "refused":
        assert "unreachable: cannot connect to 127.0.0.1" in str(err.value) and took < 3.0
    else:
        assert "asking the hub for config.json failed" in str(err.value) and took < 4.0, took


def test_cached_hub_model_loads_offline_through_the_recipe_teacher(offline_hf, tmp_path):
    src = save_ddpm_folder(tmp_path / "src")
    snap = place_in_hub_cache(offline_hf, DDPM_CIFAR10, src)
    assert fetch_hub_model(DDPM_CIFAR10) == snap
    t = load_teacher({"kind": "diffusers", "hub_id": DDPM_CIFAR10})
    direct = load_teacher({"kind": "diffusers", "path": str(src)})
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.1, 3.0])
    torch.testing.assert_close(t(x, s), direct(x, s))
    # the public model's schedule: linear betas 1e-4..0.02 over 1000 steps -> sigma in [0.0100, 157.4]
    assert t.sigma_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-3)
    assert t.sigma_max == pytest.approx(157.4, rel=1e-3)
    assert conditioning(t) == ("none", None)


def test_missing_package_is_named_before_any_fetch(monkeypatch, offline_hf):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install fkdiff\[diffusers\]"):
        load_teacher({"kind": "diffusers", "hub_id": DDPM_CIFAR10})


def test_cli_recipe_cifar10_offline_stops_at_once(tmp_path):
    """The headline command, offline, in a fresh process: exits non-zero within seconds with the clear error."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "WANDB_MODE": "offline"}
    env.pop("HF_HUB_CACHE", None)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fkdiff.distill", "recipe=cifar10", f"run_dir={tmp_path / 'run'}",
                          "logger.kind=csv"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    took = time.perf_counter() - t0
    assert res.returncode != 0
    err = res.stderr + res.stdout
    assert "TeacherUnavailableError" in err and DDPM_CIFAR10 in err and "diffusers" in err, err[-3000:]
    assert str(tmp_path / "hf" / "hub") in err, err[-3000:]
    assert not (tmp_path / "run").exists()  # a failed run leaves no folder
    # python + torch + hydra start-up only (no network wait, diffusers not even imported); the machine may be loaded,
    # so the bound is loose: the in-process test above times the fetch itself
    assert took < 150, took


# ------------------------------------------------------------------------------------------------- URL fetch


def test_url_fetch_uses_the_torch_hub_cache_and_checks_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = EDM_CIFAR10["cond-vp"]
    dst = url_cache_path(url)
    assert dst == tmp_path / "torch" / "hub" / "checkpoints" / "edm-cifar10-32x32-cond-vp.pkl"
    t0 = time.perf_counter()
    with pytest.raises(TeacherUnavailableError) as err:
        fetch_url(url, timeout=2.0)
    assert time.perf_counter() - t0 < 6.0
    for part in ("NVlabs/edm", "edm-cifar10-32x32-cond-vp.pkl", str(dst), "teacher.path=<the file>", url):
        assert part in str(err.value), (part, str(err.value))
    # a cached file is used without any network; a sha256 mismatch is refused
    dst.parent.mkdir(parents=True)
    dst.write_bytes(b"network bytes")
    import hashlib

    digest = hashlib.sha256(b"network bytes").hexdigest()
    assert fetch_url(url, sha256=digest) == dst and fetch_url(url, sha256=digest[:8]) == dst and fetch_url(url) == dst
    with pytest.raises(ValueError, match="does not match teacher.sha256"):
        fetch_url(url, sha256="00" * 32)


def test_edm_url_teacher_still_needs_the_pickle_opt_in(tmp_path, monkeypatch):
    """A fetched (here: cached) pickle is never unpickled without allow_pickle=true; a bad flag fails before any
    download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = EDM_CIFAR10["cond-vp"]
    marker = tmp_path / "ran"
    dst = url_cache_path(url)
    dst.parent.mkdir(parents=True)
    import pickle

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    dst.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PermissionError, match="allow_pickle"):
        load_teacher({"kind": "edm_pickle", "url": url})
    with pytest.raises(ValueError, match="must be true or false"):
        load_teacher({"kind": "edm_pickle", "url": url, "allow_pickle": "yes"})
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- conditioning


def test_diffusers_conditioning_is_read_from_the_unet(tmp_path):
    cond = load_teacher({"kind": "diffusers", "path": str(save_ddpm_folder(tmp_path / "c", num_classes=10))})
    uncond = load_teacher({"kind": "diffusers", "path": str(save_ddpm_folder(tmp_path / "u"))})
    assert conditioning(cond) == ("class", 10) and conditioning(uncond) == ("none", None)
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 2.0])
    y = torch.tensor([1, 7])
    assert not torch.allclose(cond(x, s, y), cond(x, s, torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="class-conditional .* no null class"):
        cond(x, s)
    with pytest.raises(ValueError, match="unconditional .* a condition was given"):
        uncond(x, s, y)


def test_edm_net_conditioning():
    from teachers import EDMDenoiser, EDMNetDenoiser

    net = EDMDenoiser.build((2,), cond_kind="class", num_classes=3, backbone={"width": 8, "num_blocks": 1})
    assert conditioning(net) == ("class", 3)
    assert conditioning(EDMNetDenoiser(lambda x, s, *c: x, label_dim=10)) == ("class", 10)
    assert conditioning(EDMNetDenoiser(lambda x, s, *c: x)) == ("none", None)
    assert conditioning(object()) == (None, None)


# ------------------------------------------------------------------------------------------------- sigma law


def test_restricted_normal_is_exact_and_moves_only_outside_draws(gen):
    """KS distance to the truncated normal within its 1% critical value (1.63 / sqrt(n)); draws inside unchanged."""
    from scipy import stats

    n = 200_000
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    for a, b in ((-0.5, 1.3), (-3.0, -1.0), (1.5, 6.0)):
        r = restrict_normal(z, a, b)
        inside = (z >= a) & (z <= b)
        assert torch.equal(r[inside], z[inside]) and r.min() >= a and r.max() <= b
        ks = stats.kstest(r.numpy(), stats.truncnorm(a, b).cdf).statistic
        assert ks < 1.63 / math.sqrt(n), (a, b, ks)
    with pytest.raises(ValueError, match="a < b"):
        restrict_normal(z, 1.0, 1.0)


def test_training_sigma_in_the_teacher_range(gen):
    lo, hi = 0.01, 157.4  # the DDPM CIFAR-10 schedule's
    s = sample_training_sigma(50_000, generator=gen, sigma_range=(lo, hi))
    assert s.min() >= lo * (1 - 1e-6) and s.max() <= hi * (1 + 1e-6)
    g2 = torch.Generator().manual_seed(1234)
    full = sample_training_sigma(50_000, generator=g2)
    inside = (full >= lo) & (full <= hi)
    assert 0 < (~inside).sum() < 500 and torch.equal(s[inside], full[inside])  # same stream, draws inside kept
