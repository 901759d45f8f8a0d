"""External-teacher adapters reproduce exact denoisers (teachers.adapters, DESIGN.md section 2).

Ground truth: a 2D Gaussian mixture with full covariances (teachers.GaussianMixture, exact D in float64). Each
synthetic "external" network below is the exact VP (DDPM) network of that mixture: given (x_t, t) it returns the
exact eps / x0 / v at the noise level it associates with step t. Wrapped by the matching adapter, it must give the
mixture's denoiser back:
- at sigmas on the schedule: to float64 round-off (1e-9);
- in between, with a net that reads fractional t the way the adapter writes it (linear in ln sigma): also exact;
- with a net that reads fractional t differently (linear in alphas_cumprod), the error is bounded by how much
  sigma moves between neighbouring steps; measured max |D - D_exact| = 2.7e-5 on the 1000-step linear DDPM
  schedule for sigma in [0.05, 10] (8.6e-5 in [0.01, 0.05]); asserted in (1e-7, 5e-4), the lower end showing the
  check can tell the two readings apart;
- with t_mode="nearest" and a net that only accepts integer steps: exact on the grid, off-grid max error measured
  2.4e-3 for sigma in [0.1, 3.2] (asserted < 1e-2).
"""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

import teachers
from teachers import (EDMDenoiser, EDMNetDenoiser, GaussianMixture, VPEpsDenoiser, VPVDenoiser, VPX0Denoiser,
                      load_edm_pickle, load_teacher, make_alphas_cumprod, vp_denoiser)
from teachers import adapters, make_preset
from teachers.adapters import from_diffusers


@pytest.fixture(scope="module")
def gmm():
    means = torch.tensor([[-1.0, 0.5], [1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    covs = torch.tensor([[[0.05, 0.02], [0.02, 0.03]],
                         [[0.02, -0.01], [-0.01, 0.04]],
                         [[0.10, 0.00], [0.00, 0.01]]], dtype=torch.float64)
    return GaussianMixture(means, covs, [0.5, 0.3, 0.2])


@pytest.fixture(scope="module")
def abar():
    return make_alphas_cumprod("linear", 1000)


class GMMVPNet(nn.Module):
    """The exact VP network of `gmm` on schedule `abar`: out(x_t, t) for output in {eps, x0, v}.

    `t_read`: how a fractional t maps to a noise level -- "log_sigma" (as the adapter interpolates), "abar" (linear in
    alphas_cumprod, a different but reasonable reading) or "integer" (raises unless t is a whole step).
    """

    def __init__(self, gmm, abar, output="eps", t_read="log_sigma"):
        super().__init__()
        self.gmm, self.output, self.t_read = gmm, output, t_read
        self.abar = abar.to(torch.float64)
        self.log_sigmas = ((1 - self.abar) / self.abar).sqrt().log()
        self.calls = 0

    def _interp(self, table, t):
        lo = t.floor().long().clamp(0, table.numel() - 2)
        w = t - lo
        return (1 - w) * table[lo] + w * table[lo + 1]

    def forward(self, x_t, t, cond=None):
        self.calls += 1
        t = t.to(torch.float64)
        if self.t_read == "integer":
            assert torch.equal(t, t.round()), "this net only knows integer steps"
            ab = self.abar[t.long()]
        elif self.t_read == "abar":
            ab = self._interp(self.abar, t)
        else:
            s = self._interp(self.log_sigmas, t).exp()
            ab = 1 / (1 + s**2)
        a, b = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
        sigma = (b / a)[:, 0]
        x = x_t / a
        x0 = self.gmm(x, sigma)
        eps = (x - x0) / (b / a)
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[self.output]


def _points(gmm, sigma, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, generator=g)
    return x0 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) * torch.randn(n, 2, generator=g,
                                                                                          dtype=torch.float64)


@pytest.mark.parametrize("output,cls", [("eps", VPEpsDenoiser), ("x0", VPX0Denoiser), ("v", VPVDenoiser)])
def test_vp_adapters_exact_on_schedule_and_between(gmm, abar, output, cls):
    den = cls(GMMVPNet(gmm, abar, output), abar, sigma_data=gmm.sigma_data)
    sig = den.sigmas
    assert den.sigma_min == pytest.approx(float(sig[0])) and den.sigma_max == pytest.approx(float(sig[-1]))
    # on the grid: a few steps, one sigma per sample
    idx = torch.tensor([0, 1, 10, 100, 500, 999]).repeat_interleave(40)
    s_grid = sig[idx]
    x = _points(gmm, s_grid, n=idx.numel())
    torch.testing.assert_close(den(x, s_grid), gmm(x, s_grid), atol=1e-9, rtol=1e-9)
    # in between (log-uniform over the whole range), net reading t like the adapter: exact too
    g = torch.Generator().manual_seed(1)
    s_mid = (sig[0].log() + torch.rand(300, generator=g, dtype=torch.float64) * (sig[-1] / sig[0]).log()).exp()
    x = _points(gmm, s_mid, n=300, seed=2)
    torch.testing.assert_close(den(x, s_mid), gmm(x, s_mid), atol=1e-9, rtol=1e-9)
    # a float sigma and float32 inputs work too
    x32 = x[:8].float()
    assert den(x32, 0.3).dtype == torch.float32
    torch.testing.assert_close(den(x32, 0.3).double(), gmm(x32.double(), 0.3), atol=1e-4, rtol=1e-4)


def test_vp_adapter_wrong_output_type_is_detected(gmm, abar):
    """The three output conventions differ: wrapping an eps net as v (or x0) does not reproduce D."""
    x = _points(gmm, 0.5)
    for cls in (VPVDenoiser, VPX0Denoiser):
        den = cls(GMMVPNet(gmm, abar, "eps"), abar)
        assert (den(x, 0.5) - gmm(x, 0.5)).abs().max() > 0.05


def test_vp_adapter_interpolation_error_bounded(gmm, abar):
    den = VPEpsDenoiser(GMMVPNet(gmm, abar, "eps", t_read="abar"), abar)
    s = torch.logspace(-1.3, 1, 400, dtype=torch.float64)  # 0.05 .. 10, mostly between grid points
    x = _points(gmm, s, n=400, seed=3)
    err = (den(x, s) - gmm(x, s)).abs().max().item()
    assert 1e-7 < err < 5e-4, err


def test_vp_adapter_nearest_mode(gmm, abar):
    den = VPEpsDenoiser(GMMVPNet(gmm, abar, "eps", t_read="integer"), abar, t_mode="nearest")
    s_grid = den.sigmas[[3, 50, 400, 900]].repeat_interleave(16)
    x = _points(gmm, s_grid, n=s_grid.numel())
    torch.testing.assert_close(den(x, s_grid), gmm(x, s_grid), atol=1e-9, rtol=1e-9)
    s_mid = torch.logspace(-1, 0.5, 64, dtype=torch.float64)
    x = _points(gmm, s_mid, n=64, seed=4)
    err = (den(x, s_mid) - gmm(x, s_mid)).abs().max().item()
    assert err < 1e-2, err
    interp = VPEpsDenoiser(GMMVPNet(gmm, abar, "eps", t_read="integer"), abar)
    with pytest.raises(AssertionError, match="integer steps"):  # the interpolating adapter passes fractional t
        interp(x, s_mid)


def test_sigma_t_roundtrip_and_range_errors(gmm, abar):
    den = VPEpsDenoiser(GMMVPNet(gmm, abar), abar)
    t = torch.tensor([0.0, 0.5, 1.0, 17.25, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(den.sigma_to_t(den.t_to_sigma(t)), t, atol=1e-9, rtol=0)
    x = _points(gmm, 1.0, n=4)
    with pytest.raises(ValueError, match="outside this schedule's range"):
        den(x, den.sigma_max * 1.5)
    with pytest.raises(ValueError, match="outside this schedule's range"):
        den(x, den.sigma_min / 2)
    with pytest.raises(ValueError, match="> 0"):
        den(x, 0.0)
    clamped = VPEpsDenoiser(GMMVPNet(gmm, abar), abar, clamp=True)
    assert torch.isfinite(clamped(x, 500.0)).all()
    with pytest.raises(ValueError, match="strictly decreasing"):
        VPEpsDenoiser(GMMVPNet(gmm, abar), abar.flip(0))
    with pytest.raises(ValueError, match="unknown prediction"):
        vp_denoiser(GMMVPNet(gmm, abar), abar, "score")


def test_alphas_cumprod_schedules():
    lin = make_alphas_cumprod("linear", 1000)
    # DDPM (Ho et al. 2020): abar_T ~ 4.0e-5 for betas 1e-4..0.02, T = 1000
    assert lin[-1].item() == pytest.approx(4.04e-5, rel=0.02)
    cos = make_alphas_cumprod("cosine", 1000)
    assert (cos[1:] < cos[:-1]).all() and 0 < cos[-1] < 1e-3
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_alphas_cumprod("quadratic")


# ---------------------------------------------------------------------------------------------------------------------
# EDM-style nets
# ---------------------------------------------------------------------------------------------------------------------
class ExactF(nn.Module):
    """The backbone F that makes EDM preconditioning return `gmm`'s exact denoiser: F = (D - c_skip x) / c_out,
    read from the backbone's own inputs u = c_in x, c_noise = ln(sigma)/4."""

    def __init__(self, gmm, sigma_data):
        super().__init__()
        self.gmm, self.sd = gmm, sigma_data

    def forward(self, u, c_noise, cond=None):
        sigma = (4 * c_noise).exp()
        s2 = (sigma**2 + self.sd**2)[:, None]
        x = u * s2.sqrt()
        c_skip, c_out = self.sd**2 / s2, sigma[:, None] * self.sd / s2.sqrt()
        return (self.gmm(x, sigma) - c_skip * x) / c_out


def test_edm_precond_roundtrip(gmm):
    den = EDMDenoiser(ExactF(gmm, 0.7), sigma_data=0.7, event_shape=(2,))
    s = torch.logspace(-2.5, 1.8, 200, dtype=torch.float64)
    x = _points(gmm, s, n=200)
    torch.testing.assert_close(den(x, s), gmm(x, s), atol=1e-9, rtol=1e-7)
    # a preconditioner with a different sigma_data than the backbone assumes is wrong (the check can fail)
    wrong = EDMDenoiser(ExactF(gmm, 0.7), sigma_data=0.5, event_shape=(2,))
    assert (wrong(x, s) - gmm(x, s)).abs().max() > 1e-2


class LabelNet(nn.Module):
    """An EDM-style net returning D itself; with labels, shifts D by the label vector (checks one-hot encoding)."""
    sigma_min, sigma_max, sigma_data, label_dim = 0.0, float("inf"), 0.6, 3

    def __init__(self, gmm):
        super().__init__()
        self.gmm = gmm

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        d = self.gmm(x, sigma)
        if class_labels is not None:
            d = d + class_labels[:, :2] - class_labels[:, 2:3]
        return d


def test_edm_net_denoiser(gmm):
    den = EDMNetDenoiser(LabelNet(gmm))
    assert (den.sigma_min, den.sigma_max, den.sigma_data) == (0.002, 80.0, 0.6)  # EDM sampler limits
    x = _points(gmm, 0.8, n=6)
    torch.testing.assert_close(den(x, 0.8), gmm(x, 0.8))  # no label: zeros vector, no shift
    y = torch.tensor([0, 1, 2, -1, 0, 1])
    shift = torch.tensor([[1, 0], [0, 1], [-1, -1], [0, 0], [1, 0], [0, 1]], dtype=torch.float64)
    torch.testing.assert_close(den(x, 0.8, y), gmm(x, 0.8) + shift)
    plain = EDMNetDenoiser(lambda x, s: gmm(x, s), sigma_data=0.5)
    torch.testing.assert_close(plain(x, torch.full((6,), 0.3)), gmm(x, 0.3))
    with pytest.raises(ValueError, match="> 0"):
        plain(x, -1.0)


# ---------------------------------------------------------------------------------------------------------------------
# EDM pickles: opt-in, and they need EDM's code importable
# ---------------------------------------------------------------------------------------------------------------------
_FAKE_EDM_MODULE = textwrap.dedent('''
    import torch
    class GaussPrecond(torch.nn.Module):
        """Stands in for NVlabs/edm's EDMPrecond: exact denoiser of N(0, sd^2 I)."""
        def __init__(self, sigma_data=0.5):
            super().__init__()
            self.sigma_min, self.sigma_max, self.sigma_data, self.label_dim = 0, float("inf"), sigma_data, 0
            self.scale = torch.nn.Parameter(torch.ones(()))
        def forward(self, x, sigma, class_labels=None, force_fp32=False):
            s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
            return self.scale * x * self.sigma_data**2 / (s**2 + self.sigma_data**2)
''')


@pytest.fixture
def edm_pickle(tmp_path, monkeypatch):
    """A network pickle whose class lives in a module `fake_edm_code` found only via code_dir."""
    code = tmp_path / "edm_code"
    code.mkdir()
    (code / "fake_edm_code.py").write_text(_FAKE_EDM_MODULE)
    monkeypatch.syspath_prepend(str(code))
    import fake_edm_code

    path = tmp_path / "network-snapshot.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": fake_edm_code.GaussPrecond(0.5)}, f)
    monkeypatch.delitem(sys.modules, "fake_edm_code")
    sys.path.remove(str(code))
    return path, code


def test_edm_pickle_opt_in_and_missing_code(edm_pickle):
    path, code = edm_pickle
    with pytest.raises(PermissionError, match="execute arbitrary code"):
        load_edm_pickle(path)
    with pytest.raises(PermissionError, match="allow_pickle"):
        load_teacher({"kind": "edm_pickle", "path": str(path)})
    with pytest.raises(ModuleNotFoundError, match="NVlabs/edm"):
        load_edm_pickle(path, allow_pickle=True)
    with pytest.raises(FileNotFoundError):
        load_edm_pickle(path.with_name("missing.pkl"), allow_pickle=True)


def test_edm_pickle_loads_with_code_dir(edm_pickle):
    path, code = edm_pickle
    den = load_teacher({"kind": "edm_pickle", "path": str(path), "allow_pickle": True, "code_dir": str(code)})
    try:
        assert str(code) not in sys.path  # code_dir is added only while unpickling
        ref = GaussianMixture(torch.zeros(1, 2), 0.25 * torch.eye(2)[None])  # N(0, 0.5^2 I)
        x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        s = torch.logspace(-2, 1.5, 16, dtype=torch.float64)
        torch.testing.assert_close(den(x, s), ref(x, s))
        assert (den.sigma_min, den.sigma_max, den.sigma_data) == (0.002, 80.0, 0.5)
        assert not any(p.requires_grad for p in den.parameters())
    finally:
        sys.modules.pop("fake_edm_code", None)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers (optional)
# ---------------------------------------------------------------------------------------------------------------------
def test_diffusers_missing_gives_install_hint(monkeypatch, abar):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install fkdiff\[diffusers\]"):
        from_diffusers(nn.Identity(), alphas_cumprod=abar)


def test_diffusers_unet_adapter(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 8), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    den = from_diffusers(unet, sched)
    assert isinstance(den, VPVDenoiser)
    x = torch.randn(2, 1, 8, 8)
    t = den.sigma_to_t(torch.tensor([0.5, 2.0]))
    out = unet(x / (1 + torch.tensor([0.25, 4.0])).sqrt()[:, None, None, None], t.float()).sample
    ref = VPVDenoiser(lambda xt, tt: out, sched.alphas_cumprod)(x, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(den(x, torch.tensor([0.5, 2.0])), ref)
    # a pipeline-style folder (unet/ + scheduler/) through load_teacher: same network, same prediction type
    unet.save_pretrained(tmp_path / "unet")
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = load_teacher({"kind": "diffusers", "path": str(tmp_path)})
    assert isinstance(loaded, VPVDenoiser)
    torch.testing.assert_close(loaded(x, torch.tensor([0.5, 2.0])), ref)


# ---------------------------------------------------------------------------------------------------------------------
# load_teacher dispatch
# ---------------------------------------------------------------------------------------------------------------------
def test_load_teacher_analytic_and_vp(tmp_path, monkeypatch, gmm, abar):
    ring = load_teacher({"kind": "analytic", "preset": "ring8"})
    assert isinstance(ring, GaussianMixture) and ring.num_components == 8
    both = load_teacher({"kind": "analytic", "preset": ["ring8", "strip"]})
    assert isinstance(both[1], teachers.Box)
    # kind=vp: a net built from an importable target, weights from a state_dict, schedule from config
    pkg = tmp_path / "vpnet"
    pkg.mkdir()
    (pkg / "my_vp_net.py").write_text(textwrap.dedent('''
        import torch
        class Net(torch.nn.Module):
            def __init__(self, dim):
                super().__init__()
                self.lin = torch.nn.Linear(dim, dim)
            def forward(self, x_t, t):
                return self.lin(x_t) * (1 + t[:, None] / 1000)
    '''))
    monkeypatch.syspath_prepend(str(pkg))
    import my_vp_net

    torch.manual_seed(0)
    net = my_vp_net.Net(2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    den = load_teacher({"kind": "vp", "target": "my_vp_net:Net", "target_kwargs": {"dim": 2},
                        "path": str(tmp_path / "w.pt"), "prediction": "eps",
                        "schedule": {"kind": "linear", "num_timesteps": 1000}})
    ref = VPEpsDenoiser(net, abar)
    x = torch.randn(5, 2)
    torch.testing.assert_close(den(x, 1.3), ref(x, 1.3))
    monkeypatch.delitem(sys.modules, "my_vp_net")


def test_load_teacher_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown teacher.kind 'bogus'"):
        load_teacher({"kind": "bogus"})
    with pytest.raises(FileNotFoundError, match="python -m teachers.train"):
        load_teacher({"kind": "checkpoint", "path": str(tmp_path / "nope.pt")})
    with pytest.raises(FileNotFoundError, match="python -m teachers.train"):
        load_teacher({"kind": "checkpoint", "path": None})
    with pytest.raises(ValueError, match="teacher.preset"):
        load_teacher({"kind": "analytic"})
    with pytest.raises(KeyError, match="unknown 2D preset"):
        load_teacher({"kind": "analytic", "preset": "nope"})
    with pytest.raises(ValueError, match="teacher.target"):
        load_teacher({"kind": "vp"})
    with pytest.raises(TypeError, match="path or a teacher config"):
        load_teacher(42)


# ---------------------------------------------------------------------------------------------------------------------
# teacher.kind=ve: continuous variance-exploding nets, x0 / eps / score outputs, from config
# ---------------------------------------------------------------------------------------------------------------------
VE_NET = '''
import torch
from teachers import make_preset


class Net(torch.nn.Module):
    """The exact ring8 denoiser in the VE convention, reported as x0, eps or score, plus a linear layer whose zero
    weights must come from the state_dict (a fresh layer is random)."""

    def __init__(self, output):
        super().__init__()
        self.output, self.gmm, self.lin = output, make_preset("ring8"), torch.nn.Linear(2, 2)

    def forward(self, x, sigma):
        d = self.gmm(x, sigma) + self.lin(x.float()).to(x.dtype)
        s = sigma[:, None]
        return {"x0": d, "eps": (x - d) / s, "score": (d - x) / s**2}[self.output]
'''


@pytest.mark.parametrize("output,cls", [("x0", adapters.VEDenoiser), ("eps", adapters.VEEpsDenoiser),
                                        ("score", adapters.VEScoreDenoiser)])
def test_ve_kind_from_config_is_exact(tmp_path, monkeypatch, output, cls):
    """`teacher.kind=ve` (or `teacher=ve`) loads a user's net from `target` + `path` and gives its exact denoiser
    whatever it predicts; the wrong output type is visibly wrong."""
    from fkdiff.recipes import compose

    pkg = tmp_path / "venet"
    pkg.mkdir()
    (pkg / "my_ve_net.py").write_text(VE_NET)
    monkeypatch.syspath_prepend(str(pkg))
    import my_ve_net

    net = my_ve_net.Net(output)
    torch.nn.init.zeros_(net.lin.weight), torch.nn.init.zeros_(net.lin.bias)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    ring = make_preset("ring8")
    s = torch.logspace(-2.5, 1.5, 200, dtype=torch.float64)
    x = _points(ring, s, n=200, seed=4)
    for alias in ("teacher.kind=ve", "teacher=ve"):
        cfg = compose(["recipe=digits", alias, "teacher.target=my_ve_net:Net", f"+teacher.target_kwargs.output={output}",
                       f"teacher.path={tmp_path / 'w.pt'}", f"teacher.prediction={output}"])
        den = load_teacher(cfg.teacher)
        assert type(den) is cls and (den.sigma_min, den.sigma_max) == (0.002, 80.0)  # EDM's range from the config
        assert not den.training and not any(p.requires_grad for p in den.parameters())
        torch.testing.assert_close(den(x, s), ring(x, s), atol=1e-9, rtol=1e-9)
    for other, wrong in adapters.VE_ADAPTERS.items():
        if other != output:
            assert (wrong(net)(x, s) - ring(x, s)).abs().max() > 0.05
    with pytest.raises(ValueError, match="teacher.prediction='v' for teacher.kind=ve"):
        load_teacher({"kind": "ve", "target": "my_ve_net:Net", "prediction": "v"})
    with pytest.raises(ValueError, match="teacher.kind=ve needs teacher.target"):
        load_teacher({"kind": "ve"})
    monkeypatch.delitem(sys.modules, "my_ve_net")
