"""fkdiff.fid (EDM's FID protocol): the Fréchet distance against closed forms, float64 statistics, EDM's uint8
quantisation, the reference statistics (published .npz fetched into the torch hub cache, or computed from the data),
and clear errors where torch-fidelity, its weights or the reference are missing. torch-fidelity does not import
beside this CPU torch, so the wiring runs with a stand-in feature map; the real extractor is tested where it imports."""

import hashlib
import math

import numpy as np
import pytest
import torch

import fkdiff.fid as F
from conftest import write_cifar
from fkdiff.recipes import compose
from teachers.hub import TeacherUnavailableError, url_cache_path


def test_frechet_distance_closed_form():
    """Commuting covariances: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2; identical sets give 0."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expect = np.square(m1 - m2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert F.frechet_distance(m1, s1, m2, s2) == pytest.approx(expect, rel=1e-9)
    assert abs(F.frechet_distance(m1, s1, m1, s1)) < 1e-9


def test_feature_stats_are_the_unbiased_float64_moments(gen):
    x = torch.randn(257, 5, generator=gen, dtype=torch.float64) * torch.arange(1, 6) + 3
    st = F.FeatureStats()
    for chunk in x.split(40):
        st.update(chunk.float())
    mu, sigma = st.mu_sigma()
    ref = x.float().double().numpy()
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        F.FeatureStats().mu_sigma()


def test_edm_quantisation():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 8)
    u = F.to_uint8_edm(x)
    assert u.shape == (1, 3, 1, 8) and u.dtype == torch.uint8
    # EDM: (x * 127.5 + 128).clip(0, 255).to(uint8) -- truncation of x * 127.5 + 128
    assert u[0, 0, 0].tolist() == [0, 0, 64, 128, 191, 255, 255, 255]
    with pytest.raises(ValueError, match=r"\[B, 1 or 3, H, W\]"):
        F.to_uint8_edm(torch.zeros(2, 2, 4, 4))


def test_missing_torch_fidelity_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    with pytest.raises(F.FIDUnavailableError, match=r"pip install 'fkdiff\[fid\]'.*torchvision build that matches"):
        F.inception_features(tmp_path / "weights.pth")


def test_inception_weights_checked_before_anyone_unpickles_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=r"weights-inception-2015-12-05-6726825d.pth.*curl -L -o .*never"):
        F.inception_weights_path()
    # a planted pickle under another name: refused by the weights-only load, nothing runs
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (__import__("pathlib").Path.touch, (marker,))

    import pickle

    bad = tmp_path / "inception.pth"
    bad.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(ValueError, match="not a plain weights file"):
        F.inception_weights_path(bad)
    assert not marker.exists()
    good = tmp_path / "mine.pth"
    torch.save({"w": torch.zeros(2)}, good)
    assert F.inception_weights_path(good) == good
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    assert F.inception_weights_path(good, sha256=digest) == good
    from fkdiff.files import ChecksumError

    with pytest.raises(ChecksumError, match="differs from the expected"):
        F.inception_weights_path(good, sha256="0" * 64)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="not a plain weights file"):
        F.inception_weights_path(tmp_path / "empty.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state_dict of tensors"):
        F.inception_weights_path(tmp_path / "list.pth")


def _code_pickle(path, marker):
    """A pickle whose loading would run code (create `marker`): what a tampered weights file looks like."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (__import__("pathlib").Path.touch, (marker,))

    path.write_bytes(pickle.dumps({"w": Evil()}))
    return path


def test_both_fid_paths_refuse_a_pickle_with_code(tmp_path, monkeypatch):
    """The one weights check (fkdiff.metrics.inception.inception_weights_path) guards both FID paths: the EDM-protocol
    command (fkdiff.fid) and fid_kid (and its CLI): a planted pickle is refused before torch-fidelity, torchmetrics or
    any sampling touches it, and nothing in it runs. The same file at the cache path is refused too."""
    import fkdiff.metrics as M
    from fkdiff.metrics.__main__ import main as metrics_main

    marker = tmp_path / "ran"
    bad = _code_pickle(tmp_path / "inception.pth", marker)
    torch.save({"samples": torch.zeros(4, 3, 8, 8)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a plain weights file"):
        F.fid(compose(["recipe=cifar10", "task=fid", f"run_dir={tmp_path / 'run'}", f"fid.samples={tmp_path / 'x.pt'}",
                       "fid.num_samples=4", f"fid.weights={bad}"]))
    with pytest.raises(ValueError, match="not a plain weights file"):
        M.fid_kid(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8), weights_path=bad)
    with pytest.raises(ValueError, match="not a plain weights file"):
        metrics_main(["fid", str(tmp_path / "x.pt"), str(tmp_path / "x.pt"), "--key", "samples", "--weights", str(bad)])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / F.INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    _code_pickle(cached, marker)
    with pytest.raises(ValueError, match="not a plain weights file"):
        F.fid(compose(["recipe=cifar10", "task=fid", f"run_dir={tmp_path / 'run'}", f"fid.samples={tmp_path / 'x.pt'}",
                       "fid.num_samples=4"]))
    with pytest.raises(ValueError, match="not a plain weights file"):
        M.fid_kid(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8))
    assert not marker.exists()
    assert F.inception_weights_path is M.inception_weights_path and F.FIDUnavailableError is M.FIDUnavailableError


def test_edm_reference_statistics_cached_or_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(TeacherUnavailableError, match=r"cifar10-32x32.npz.*nvlabs-fi-cdn"):
        F.load_reference("edm", "cifar10", timeout=2.0)
    with pytest.raises(ValueError, match="publishes reference statistics for"):
        F.load_reference("edm", "digits")
    path = url_cache_path(F.FID_REFS["cifar10"])
    path.parent.mkdir(parents=True)
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(path, mu=mu, sigma=sigma)
    m, s, desc = F.load_reference("edm", "cifar10")
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)
    assert "nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz" in desc
    obj = tmp_path / "obj.npz"
    np.savez(obj, mu=np.array([{"a": 1}], dtype=object), sigma=sigma)
    with pytest.raises(ValueError, match="allow_pickle"):
        F.load_reference(str(obj), "cifar10")


def _stand_in(monkeypatch, tmp_path):
    """Replace the Inception network by a fixed random projection of the uint8 pixels (same interface); its weights
    file is a plain state_dict (fid.weights) whose sha256 fid.json records."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    proj = torch.randn(3 * 32 * 32, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monkeypatch.setattr(F, "inception_features", lambda weights=None, device="cpu": (
        lambda u: (u.to(torch.float64).flatten(1) / 255) @ proj))


def test_fid_command_wiring(tmp_path, monkeypatch):
    """python -m fkdiff.fid on a samples file against the data reference: FID of the training images against their
    own statistics is 0; other images give a positive value; fewer images than fid.num_samples is an error."""
    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", n_per_batch=40)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _stand_in(monkeypatch, tmp_path)
    base = ["recipe=cifar10", "task=fid", f"data.root={tmp_path / 'cifar'}", "fid.ref=data", "fid.batch=64",
            f"fid.weights={tmp_path / 'weights.pth'}"]
    from fkdiff.training import build_datamodule_from_config

    dm = build_datamodule_from_config(compose(base).data)
    dm.setup("fit")
    train = dm.train_set.__getitems__(list(range(len(dm.train_set))))["x"]
    torch.save({"samples": train}, tmp_path / "same.pt")
    out = F.fid(compose(base + [f"run_dir={tmp_path / 'a'}", f"fid.samples={tmp_path / 'same.pt'}",
                                f"fid.num_samples={len(train)}"]))
    assert abs(out["fid"]) < 1e-6 and (tmp_path / "a" / "fid.json").is_file()
    assert out["weights_sha256"] == hashlib.sha256((tmp_path / "weights.pth").read_bytes()).hexdigest()
    assert "training images (200)" in out["reference"]
    torch.save(torch.rand(300, 3, 32, 32) * 2 - 1, tmp_path / "noise.pt")
    out = F.fid(compose(base + [f"run_dir={tmp_path / 'b'}", f"fid.samples={tmp_path / 'noise.pt'}",
                                "fid.num_samples=300"]))
    assert out["fid"] > 1.0 and "statistics cached at" in out["reference"]  # the reference is reused
    with pytest.raises(ValueError, match="fewer than fid.num_samples=50000"):
        F.fid(compose(base + [f"run_dir={tmp_path / 'c'}", f"fid.samples={tmp_path / 'noise.pt'}"]))
    with pytest.raises(ValueError, match="exactly one of fid.student"):
        F.fid(compose(base + [f"run_dir={tmp_path / 'd'}"]))


def test_fid_command_without_torch_fidelity_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    with pytest.raises(F.FIDUnavailableError, match="fkdiff\\[fid\\]"):
        F.fid(compose(["recipe=cifar10", "task=fid", f"run_dir={tmp_path}", "fid.samples=x.pt",
                       f"fid.weights={tmp_path / 'weights.pth'}"]))


def test_real_inception_where_it_imports(tmp_path):
    """Where torch-fidelity imports and the weights are cached: 2048-d finite features of uint8 images."""
    try:
        F.inception_weights_path()
        __import__("fkdiff.metrics.inception").metrics.inception._import_fidelity_extractor()
    except (F.FIDUnavailableError, FileNotFoundError) as e:
        pytest.skip(f"FID extractor unavailable here: {str(e)[:120]}")
    feats = F.inception_features()(F.to_uint8_edm(torch.rand(4, 3, 32, 32) * 2 - 1))
    assert feats.shape == (4, 2048) and torch.isfinite(feats).all() and feats.dtype == torch.float64


def _tiny_student(path, num_classes=None):
    from fkdiff.energy import build_student, save_student

    st = build_student((3, 8, 8), 0.5, "l2", backbone={"kind": "unet", "channels": [4], "emb_dim": 8},
                       cond_kind="class" if num_classes else "none", num_classes=num_classes)
    return save_student(st, path)


def test_smc_images_from_a_class_conditional_student(tmp_path, monkeypatch):
    """fid.student: batches of at most fid.batch equally weighted SMC samples; a class-conditional student's batch i
    is drawn from class i mod K (exactly balanced over whole rounds); the same seed gives the same images; SMC needs
    two particles a batch."""
    import fkdiff.compose

    path = _tiny_student(tmp_path / "student.pt", num_classes=3)
    labels = []
    real = fkdiff.compose.conditioned
    monkeypatch.setattr(fkdiff.compose, "conditioned", lambda m, y: labels.append(y) or real(m, y))
    cfg = compose(["task=fid", "sample.num_levels=3", "sample.sigma_max=5.0", "sample.sigma_min=0.05",
                   "sample.mcmc.num_steps=1"])
    out = list(F.smc_images(cfg, path, 14, 4))
    assert [b.shape for b in out] == [(4, 3, 8, 8)] * 2 + [(3, 3, 8, 8)] * 2  # ceil(14 / 4) batches, even sizes
    assert labels == [0, 1, 2, 0] and all(torch.isfinite(b).all() for b in out)
    again = list(F.smc_images(cfg, path, 14, 4))
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    uncond = _tiny_student(tmp_path / "uncond.pt")
    labels.clear()
    assert [b.shape[0] for b in F.smc_images(cfg, uncond, 5, 4)] == [3, 2] and labels == []
    with pytest.raises(ValueError, match="at least 2 particles"):
        next(F.smc_images(cfg, uncond, 5, 1))


def test_fid_command_on_a_student(tmp_path, monkeypatch):
    """python -m fkdiff.fid fid.student=<student.pt>: the whole count drawn, the FID finite and positive, fid.json
    names the generator and the reference."""
    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", n_per_batch=8)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    proj = torch.randn(3 * 2 * 2, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monkeypatch.setattr(F, "inception_features", lambda weights=None, device="cpu": (  # any image size, as Inception
        lambda u: (torch.nn.functional.adaptive_avg_pool2d(u.double(), 2).flatten(1) / 255) @ proj))
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    path = _tiny_student(tmp_path / "student.pt", num_classes=10)
    out = F.fid(compose(["recipe=cifar10", "task=fid", f"data.root={tmp_path / 'cifar'}", "fid.ref=data",
                         f"fid.weights={tmp_path / 'weights.pth'}",
                         f"run_dir={tmp_path / 'run'}", f"fid.student={path}", "fid.num_samples=12", "fid.batch=4",
                         "sample.num_levels=3", "sample.sigma_max=5.0", "sample.sigma_min=0.05"]))
    assert math.isfinite(out["fid"]) and out["fid"] > 0 and out["num_samples"] == 12
    assert "12 SMC samples of" in out["generated"] and "training images (40)" in out["reference"]
    assert (tmp_path / "run" / "fid.json").is_file()


def test_fid_student_runs_on_its_fast_path(tmp_path, monkeypatch):
    """fid.fast_path reaches EnergyStudent.fast_path through the model spec (sample.models.<name>.fast_path too);
    bf16 autocast runs on CPU and gives finite images."""
    from fkdiff.energy import EnergyStudent

    calls = []
    real = EnergyStudent.fast_path
    monkeypatch.setattr(EnergyStudent, "fast_path", lambda self, **kw: calls.append(kw) or real(self, **kw))
    path = _tiny_student(tmp_path / "student.pt", num_classes=3)
    cfg = compose(["task=fid", "sample.num_levels=3", "sample.sigma_max=5.0", "sample.sigma_min=0.05",
                   "fid.fast_path={precision: bf16, channels_last: true}"])
    (x,) = F.smc_images(cfg, path, 4, 4, fast_path=cfg.fid.fast_path)
    assert calls == [{"precision": "bf16", "channels_last": True}] and torch.isfinite(x).all()
