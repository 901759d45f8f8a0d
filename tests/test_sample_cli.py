"""python -m fkdiff.sample: models + composition expression -> SMC -> files; checked against the exact answer.

Every `sample.*` option has a test below that runs the entry point (in-process through `run(cfg)` with the composed
config, or through torchrun for the multi-process options) and checks that the option had its effect; the mapping
`OPTION_TESTS` lists them and `test_every_sample_option_has_a_cli_test` fails when an option is added without one.
Tolerances for statistical checks follow tests/test_smc.py: a mode mass p from N weighted particles within
Z_TOL = 4.5 standard errors of a variance inflated by INFLATION = 8 over the i.i.d. p (1 - p) / N.
"""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from omegaconf import OmegaConf

from fkdiff.recipes import compose
from fkdiff import compose as C
from fkdiff import mcmc
from fkdiff.models import load_model, use_students
from fkdiff.sample import run
from teachers import ring8, strip
from teachers.analytic import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
Z_TOL, INFLATION = 4.5, 8.0
FAST = ["recipe=toy2d", "sample.progress=false", "sample.compare_reverse_diffusion=false", "sample.plot.enabled=false",
        "sample.num_particles=200", "sample.num_levels=20", "seed=3"]


def _run(tmp_path, *overrides, name="run"):
    """Run the CLI at a tiny size (later overrides win); returns (diagnostics, samples.pt contents, config)."""
    out = tmp_path / name
    cfg = compose([*FAST, f"run_dir={out}", *overrides])
    diag = run(cfg)
    return diag, torch.load(out / "samples.pt"), cfg


def _masses(x, w, centers):
    idx = torch.cdist(x.double(), centers.double()).argmin(1)
    return torch.zeros(len(centers), dtype=torch.float64).index_add_(0, idx, w.double())


@functools.lru_cache(maxsize=None)
def _exact_log_z_ring_strip(sigma: float) -> float:
    """log ∫ q_ring,sigma q_strip,sigma dx by a fine 2D grid (the strip confines x to about [-0.1, 0.1])."""
    r, s = ring8(), strip()
    xs = torch.linspace(-0.13, 0.13, 261, dtype=torch.float64)
    ys = torch.linspace(-1.3, 1.3, 1301, dtype=torch.float64)
    xx, yy = torch.meshgrid(xs, ys, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    logp = -(r.energy(pts, sigma) + s.energy(pts, sigma))
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    return float(torch.logsumexp(logp, 0) + cell.log())


# --------------------------------------------------------------------------------------------------------------------
# the composition demo end to end


def test_cli_product_matches_exact_log_z(tmp_path):
    cfg = compose(["recipe=toy2d", f"run_dir={tmp_path}", "sample.num_particles=600", "sample.num_levels=60",
                   "sample.progress=false", "sample.compare_reverse_diffusion=false", "seed=3"])
    diag = run(cfg)
    for f in ("config.yaml", "samples.pt", "diagnostics.json", "samples.png", "diagnostics.png"):
        assert (tmp_path / f).is_file(), f
    on_disk = json.loads((tmp_path / "diagnostics.json").read_text())
    assert on_disk["log_Z"] == pytest.approx(diag["log_Z"])
    assert len(on_disk["ess"]) == 60 and on_disk["acceptance"] is not None
    exact = _exact_log_z_ring_strip(cfg.sample.sigma_min)
    # 4 standard errors of the SMC estimate, plus 0.05 for the 60-level discretisation
    assert abs(diag["log_Z"] - exact) < 4 * diag["log_Z_se"] + 0.05, (diag["log_Z"], exact, diag["log_Z_se"])
    saved = torch.load(tmp_path / "samples.pt")
    x = saved["resampled"]
    assert torch.isfinite(x).all()
    # the product lives in the strip and at the ring's top/bottom modes: |y| near 0.5, |x| <= 0.1
    assert (x[:, 0].abs() <= 0.1 + 1e-6).float().mean() > 0.99
    assert ((x[:, 1].abs() - 0.5).abs() < 0.2).float().mean() > 0.99


def test_expression_language():
    m = {"a": ring8(), "b": strip()}
    t = C.parse("mixture(a, tempered(b, 2.0), weights=[1, 3])", m)
    x = torch.zeros(4, 2, dtype=torch.float64)
    e = t.energy(x, 0.5)
    expect = -torch.logsumexp(torch.stack([math.log(0.25) - m["a"].energy(x, 0.5),
                                           math.log(0.75) - 2.0 * m["b"].energy(x, 0.5)]), 0)
    torch.testing.assert_close(e, expect)
    with pytest.raises(ValueError, match="unknown model 'c'"):
        C.parse("product(a, c)", m)
    with pytest.raises(ValueError, match="unsupported syntax"):
        C.parse("__import__('os')", m)
    with pytest.raises(ValueError, match="cannot parse"):
        C.parse("product(a,", m)
    # the entry point's former names stay importable
    from fkdiff.sample import Conditioned, build_mcmc, parse_expression

    assert parse_expression is C.parse and build_mcmc is mcmc.build and Conditioned is C.Conditioned


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown model kind"):
        load_model({"kind": "magic"})
    with pytest.raises(ValueError, match="needs `preset:`"):
        load_model({"kind": "analytic"})
    with pytest.raises(ValueError, match="unknown mcmc kind"):
        mcmc.build({"kind": "gibbs"})
    assert mcmc.build({"kind": "none"}) is None and mcmc.build(None) is None


def test_students_replace_analytic_models(tmp_path):
    """sample.students=<distill run> composes the distilled students (here untrained, saved as distill does)."""
    from fkdiff import load_energy
    from fkdiff.energy import build_student, save_student

    run_dir = tmp_path / "runs" / "distill" / "2026-01-01_00-00-00"
    for preset in ("ring8", "strip"):
        st = build_student((2,), 0.5, "l2", backbone={"kind": "mlp", "width": 16, "num_blocks": 1})
        save_student(st, run_dir / preset / "student.pt")
    cfg = compose(["recipe=toy2d", f"run_dir={tmp_path / 'out'}", f"sample.students={run_dir}",
                   "sample.num_particles=64", "sample.num_levels=8", "sample.progress=false",
                   "sample.compare_reverse_diffusion=false", "sample.plot.enabled=false"])
    diag = run(cfg)
    assert math.isfinite(diag["log_Z"]) and len(diag["ess"]) == 8
    specs = use_students(cfg.sample.models, "latest", runs_root=tmp_path / "runs" / "distill")
    assert specs["ring"]["path"] == str(run_dir / "ring8" / "student.pt")
    student = load_energy(specs["strip"]["path"])
    x = torch.zeros(3, 2)
    torch.testing.assert_close(student.energy(x, 0.3), load_energy(run_dir / "strip" / "student.pt").energy(x, 0.3))
    with pytest.raises(FileNotFoundError, match="run `python -m fkdiff.distill` first"):
        use_students(cfg.sample.models, "latest", runs_root=tmp_path / "nothing")
    (run_dir / "strip" / "student.pt").unlink()
    with pytest.raises(FileNotFoundError, match="students there"):
        use_students(cfg.sample.models, str(run_dir))


# --------------------------------------------------------------------------------------------------------------------
# one test per sample.* option


def test_models_and_target_mixture(tmp_path):
    """sample.models + sample.target: a mixture of the two normalised presets is normalised (log Z = 0), and its
    mass splits 1 : 3 between them."""
    diag, saved, _ = _run(tmp_path, 'sample.target="mixture(ring, strip, weights=[1, 3])"', "sample.num_particles=600",
                          "sample.num_levels=40")
    assert diag["target"] == "mixture(ring, strip, weights=[1, 3])"
    assert abs(diag["log_Z"]) < 4 * diag["log_Z_se"] + 0.05, diag["log_Z"]
    x, w = saved["samples"].double(), saved["log_weights"].exp()
    # |x_0| > 0.2 holds only the ring's six modes off the strip (std 0.05, centres at |x_0| >= 0.354): 1/4 * 6/8
    off_strip = float(w[x[:, 0].abs() > 0.2].sum())
    assert abs(off_strip - 0.1875) < Z_TOL * math.sqrt(INFLATION * 0.1875 * 0.8125 / 600), off_strip


def test_proposal(tmp_path):
    """sample.proposal: a separate score field drives the moves (one more evaluation per level and per MCMC
    refresh, except at the last level), the weights still target the product."""
    d0, _, cfg = _run(tmp_path, "sample.num_particles=300", "sample.num_levels=40", name="own")
    d1, _, _ = _run(tmp_path, "sample.proposal=ring", "sample.num_particles=300", "sample.num_levels=40", name="ring")
    assert d1["nfe"] - d0["nfe"] == pytest.approx(2 * (40 - 1))
    exact = _exact_log_z_ring_strip(cfg.sample.sigma_min)
    assert abs(d1["log_Z"] - exact) < 4 * d1["log_Z_se"] + 0.05, (d1["log_Z"], exact)


def test_shape(tmp_path):
    """sample.shape: given explicitly it equals the inferred event shape; a wrong one is the models' error."""
    _, inferred, _ = _run(tmp_path, name="a")
    _, explicit, _ = _run(tmp_path, "sample.shape=[2]", name="b")
    assert torch.equal(inferred["samples"], explicit["samples"]) and explicit["samples"].shape == (200, 2)
    with pytest.raises(ValueError, match="2-dimensional"):
        _run(tmp_path, "sample.shape=[3]", name="c")


def test_num_particles_num_levels_and_sigma_range(tmp_path):
    diag, saved, _ = _run(tmp_path, "sample.num_particles=120", "sample.num_levels=17", "sample.sigma_max=5.0",
                          "sample.sigma_min=0.01")
    assert saved["samples"].shape == (120, 2) and saved["resampled"].shape == (120, 2)
    assert diag["num_particles"] == 120 and len(diag["ess"]) == 17 and len(diag["sigmas"]) == 17
    assert diag["num_levels"] == 17
    assert diag["sigmas"][0] == 5.0 and diag["sigmas"][-1] == 0.01
    assert all(a > b for a, b in zip(diag["sigmas"], diag["sigmas"][1:]))
    # sample.num_steps: the deprecated former name of num_levels still works, with a DeprecationWarning
    with pytest.warns(DeprecationWarning, match="sample.num_levels"):
        old, _, _ = _run(tmp_path, "sample.num_steps=12", name="alias")
    assert old["num_levels"] == 12 and len(old["ess"]) == 12


def test_budget_plans_levels_kernel_and_formulation(tmp_path):
    """sample.budget=B: num_levels is ignored, the plan (diagnostics.json "plan") uses at most B evaluations per
    particle and gets the product's exact log Z; a tempered(g, 3) target runs twisted (fewer than 150 levels) with
    LowTemperature(3, ramp=3) and the plan's 1 HMC step per level (sample.mcmc.num_steps left null) and gets
    log ∫ p^3 (grid-exact)."""
    diag, _, _ = _run(tmp_path, "sample.budget=120", "sample.num_particles=200", "sample.num_levels=7")
    plan = json.loads((tmp_path / "run" / "diagnostics.json").read_text())["plan"]
    assert plan["budget"] == 120 and 100 < plan["used_evaluations"] <= 120 and plan["schedule"] == "adaptive (pilot CESS)"
    assert diag["num_levels"] == plan["num_levels"] == len(diag["sigmas"]) != 7
    exact = _exact_log_z_ring_strip(0.002)
    assert abs(diag["log_Z"] - exact) < 4 * diag["log_Z_se"] + 0.1, (diag["log_Z"], exact, diag["log_Z_se"])
    w = [4.0, 1, 1, 1, 1, 1, 1, 1]
    cold, _, _ = _run(tmp_path, _weighted_ring(w), "sample.target='tempered(g, 3)'", "sample.budget=150",
                      "sample.num_particles=200", name="cold")
    assert cold["plan"]["mode"] == "twisted" and "LowTemperature(3, ramp=3)" in cold["plan"]["formulation"]
    assert "num_steps=1" in cold["plan"]["mcmc"] and cold["plan"]["used_evaluations"] <= 150
    g = torch.linspace(-1.0, 1.0, 801, dtype=torch.float64)
    log_z = float(torch.logsumexp(-3.0 * ring8(weights=w).energy(torch.cartesian_prod(g, g), 0.002), 0)) + 2 * math.log(
        float(g[1] - g[0]))
    assert abs(cold["log_Z"] - log_z) < 4 * cold["log_Z_se"] + 0.1, (cold["log_Z"], log_z, cold["log_Z_se"])


def test_mode_twisted_without_potentials_is_the_proposal(tmp_path):
    """sample.mode=twisted: the potentials telescope; with none every weight is one (log Z = 0, ESS = N, no
    resampling), whereas sampler mode weights the product."""
    diag, _, _ = _run(tmp_path, "sample.mode=twisted")
    assert diag["log_Z"] == 0.0 and all(e == pytest.approx(200) for e in diag["ess"]) and not any(diag["resampled"])
    sampler, _, _ = _run(tmp_path, name="sampler")
    assert sampler["min_ess"] < 150


def _weighted_ring(weights):
    return f"+sample.models.g={{kind: analytic, preset: ring8, preset_kwargs: {{weights: {list(weights)}}}}}"


def test_temperature_sharpens_mode_masses(tmp_path):
    """sample.temperature=beta (twisted mode): mode masses of p^beta. For ring8 with weights w (equal widths)
    the masses of p^beta are w^beta / sum w^beta: 4/11 -> 64/71 on the heavy mode at beta = 3."""
    w = torch.tensor([4.0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    n = 500
    common = [_weighted_ring(w.tolist()), "sample.target=g", "sample.mode=twisted", f"sample.num_particles={n}",
              "sample.num_levels=50"]
    cold, cold_saved, _ = _run(tmp_path, *common, "sample.temperature=3", "sample.mcmc.num_steps=2", name="cold")
    warm, warm_saved, _ = _run(tmp_path, *common, "sample/mcmc=none", name="warm")
    centers = ring8().means
    for saved, beta in ((cold_saved, 3.0), (warm_saved, 1.0)):
        est = _masses(saved["samples"], saved["log_weights"].exp(), centers)
        exact = w**beta / (w**beta).sum()
        for k in range(8):
            p = max(float(exact[k]), 1.0 / n)
            assert abs(float(est[k]) - float(exact[k])) <= Z_TOL * math.sqrt(INFLATION * p * (1 - p) / n), (beta, est)
    # log Z of the tilted model: log E_p[p^(beta - 1)] = log ∫ p^3 (the preset is normalised), grid-exact
    g = torch.linspace(-1.0, 1.0, 801, dtype=torch.float64)
    pts = torch.cartesian_prod(g, g)
    gm = ring8(weights=w.tolist())
    log_z = float(torch.logsumexp(-3.0 * gm.energy(pts, 0.002), 0)) + 2 * math.log(float(g[1] - g[0]))
    assert abs(cold["log_Z"] - log_z) < 4 * cold["log_Z_se"] + 0.1, (cold["log_Z"], log_z)
    assert warm["log_Z"] == 0.0
    with pytest.raises(ValueError, match="needs sample.mode=twisted"):
        _run(tmp_path, "sample.temperature=3", name="sampler_mode")


def test_bounds_zero_violations(tmp_path):
    """sample.bounds: the hard box at the last level; no returned point (weighted or resampled) violates it, and the
    product's mass moves to the one ring mode inside the box."""
    diag, saved, _ = _run(tmp_path, "sample.bounds={low: [-0.2, 0.0], high: [0.2, 1.0]}", "sample.num_particles=300",
                          "sample.num_levels=40")
    low, high = torch.tensor([-0.2, 0.0], dtype=torch.float64), torch.tensor([0.2, 1.0], dtype=torch.float64)
    for key in ("samples", "resampled"):
        x = saved[key].double()
        assert ((x >= low) & (x <= high)).all(), key
    assert ((saved["resampled"][:, 1] - 0.5).abs() < 0.2).all()
    # half of the product's mass is in the box: log Z drops by log 2
    exact = _exact_log_z_ring_strip(0.002) - math.log(2.0)
    assert abs(diag["log_Z"] - exact) < 4 * diag["log_Z_se"] + 0.1, (diag["log_Z"], exact)


def test_potentials(tmp_path):
    """sample.potentials: any registered potential by name; a box given this way is the same run as sample.bounds."""
    box = "{kind: box, low: [-0.2, 0.0], high: [0.2, 1.0]}"
    d1, s1, _ = _run(tmp_path, f"+sample.potentials.upper={box}", name="spec")
    d2, s2, _ = _run(tmp_path, "sample.bounds={low: [-0.2, 0.0], high: [0.2, 1.0]}", name="bounds")
    assert torch.equal(s1["samples"], s2["samples"]) and d1["log_Z"] == d2["log_Z"]
    assert (s1["resampled"][:, 1] >= 0).all()
    # a general linear constraint (fkdiff.smc.Polytope) by name: the half-plane x_0 + x_1 <= 0 keeps the mode at
    # (0, -0.5) and drops the one at (0, 0.5): half the product's mass
    d3, s3, _ = _run(tmp_path, "+sample.potentials.cut={kind: polytope, A: [[1, 1]], b: [0.0]}",
                     "sample.num_particles=300", "sample.num_levels=40", name="polytope")
    assert (s3["samples"].sum(1) <= 0).all() and (s3["resampled"][:, 1] < 0).all()
    exact = _exact_log_z_ring_strip(0.002) - math.log(2.0)
    assert abs(d3["log_Z"] - exact) < 4 * d3["log_Z_se"] + 0.1, (d3["log_Z"], exact)
    with pytest.raises(ValueError, match="unknown potential kind 'moat'"):
        _run(tmp_path, "+sample.potentials.p={kind: moat}", name="bad")
    with pytest.raises(ValueError, match="potential 'box'"):
        _run(tmp_path, "+sample.potentials.p={kind: box, low: [0, 0]}", name="bad2")


@pytest.mark.parametrize("kind", [*mcmc.KERNELS, "none"])
def test_mcmc_kernels(tmp_path, kind):
    """sample/mcmc=<kind> for every registered kernel: it runs at every level (1 evaluation per level to propagate,
    plus the kernel's own, counted in nfe); unadjusted kernels report acceptance 1; none is plain SMC."""
    diag, _, cfg = _run(tmp_path, f"sample/mcmc={kind}")
    assert cfg.sample.mcmc.kind == kind
    kernel = mcmc.build(OmegaConf.to_container(cfg.sample.mcmc))
    per_move = 0 if kernel is None else kernel.num_steps * getattr(kernel, "num_leapfrog", 1)
    assert diag["nfe"] == pytest.approx(20 * (1 + per_move))
    if kind == "none":
        assert diag["acceptance"] is None
    elif not kernel.adjusted:
        assert all(a == 1.0 for a in diag["acceptance"])
    else:
        assert 0.2 < diag["mean_acceptance"] < 1.0


def test_mcmc_options(tmp_path):
    """sample.mcmc.num_steps / num_leapfrog / step_size / target_accept / damping reach the kernel."""
    diag, _, _ = _run(tmp_path, "sample.mcmc.num_steps=2", "sample.mcmc.num_leapfrog=5", name="steps")
    assert diag["nfe"] == pytest.approx(20 * (1 + 2 * 5))
    diag, _, _ = _run(tmp_path, "sample.mcmc.step_size=0.01", name="fixed")
    assert diag["step_size"] == [0.01] * 20
    # the adapted step size follows the target acceptance: a higher target gives a higher mean acceptance
    acc = {}
    for ta in (0.3, 0.95):
        d, _, _ = _run(tmp_path, f"sample.mcmc.target_accept={ta}", "sample.num_levels=60", name=f"ta{ta}")
        acc[ta] = d["mean_acceptance"]
    assert acc[0.95] > acc[0.3] + 0.2, acc
    assert mcmc.build({"kind": "hmc", "damping": 0.5, "target_accept": None}).damping == 0.5
    with pytest.raises(ValueError, match="select the kernel with sample/mcmc=mala"):
        _run(tmp_path, "sample.mcmc.kind=mala", name="bad")


def test_resample_scheme_is_used(tmp_path, monkeypatch):
    """sample.resample: the named scheme draws the ancestors (and only it); an unknown one lists the schemes."""
    from fkdiff.smc import resampling

    calls = {k: 0 for k in resampling.RESAMPLERS}
    for name, fn in list(resampling.RESAMPLERS.items()):
        def counting(lw, num, gen, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(lw, num, gen)
        monkeypatch.setitem(resampling.RESAMPLERS, name, counting)
    for scheme in ("multinomial", "residual"):
        before = dict(calls)
        diag, _, _ = _run(tmp_path, f"sample.resample={scheme}", name=scheme)
        used = {k: calls[k] - before[k] for k in calls}
        # one call per resampling event plus the final equally weighted resample (systematic, fkdiff.sample)
        assert used[scheme] == diag["num_resampled"] > 0 and used["systematic"] == 1, used
    with pytest.raises(KeyError, match="available"):
        _run(tmp_path, "sample.resample=bogus", name="bogus")


def test_ess_threshold(tmp_path):
    never, _, _ = _run(tmp_path, "sample.ess_threshold=0.0", name="never")
    always, _, _ = _run(tmp_path, "sample.ess_threshold=1.0", name="always")
    assert not any(never["resampled"]) and all(always["resampled"])


def test_final_denoise(tmp_path):
    """sample.final_denoise: the returned points are D(x, sigma_min) = x + sigma_min^2 score(x) of the same run."""
    _, on, cfg = _run(tmp_path, "sample.final_denoise=true", name="on")
    _, off, _ = _run(tmp_path, "sample.final_denoise=false", name="off")
    x = off["samples"].double()
    score = C.product(ring8(), strip()).score(x, cfg.sample.sigma_min)
    alive = off["log_weights"] > -math.inf
    torch.testing.assert_close(on["samples"][alive], (x + cfg.sample.sigma_min**2 * score)[alive])
    assert not torch.equal(on["samples"], off["samples"])


def test_init_std(tmp_path):
    """sample.init_std: the initial N(0, s0^2) against the product at sigma_max (variance sigma_max^2 / 2 per
    coordinate, up to the tiny data scale): ESS_0 / N = 1 / E_q[w^2] = 0.75 for s0 = sigma_max, 0.23 for 2 sigma_max."""
    default, _, _ = _run(tmp_path, "sample.num_particles=1000", name="default")
    wide, _, _ = _run(tmp_path, "sample.num_particles=1000", "sample.init_std=20.0", name="wide")
    assert abs(default["ess"][0] / 1000 - 0.75) < 0.1 and abs(wide["ess"][0] / 1000 - 0.234) < 0.1


def test_max_batch_chunks_without_changing_results(tmp_path, monkeypatch):
    seen = []
    energy = GaussianMixture.energy

    def recording(self, x, sigma):
        seen.append(x.shape[0])
        return energy(self, x, sigma)

    monkeypatch.setattr(GaussianMixture, "energy", recording)
    d_all, s_all, _ = _run(tmp_path, name="all")
    assert max(seen) == 200
    seen.clear()
    d_chunk, s_chunk, _ = _run(tmp_path, "sample.max_batch=64", name="chunked")
    assert max(seen) == 64
    assert torch.equal(s_all["samples"], s_chunk["samples"]) and d_all["log_Z"] == d_chunk["log_Z"]


def test_device_cpu(tmp_path):
    _, saved, _ = _run(tmp_path, "sample.device=cpu")
    assert saved["samples"].device.type == "cpu"


@pytest.mark.gpu
def test_device_cuda(tmp_path):
    diag, saved, _ = _run(tmp_path, "sample.device=cuda")
    assert math.isfinite(diag["log_Z"]) and torch.isfinite(saved["samples"]).all()


def test_progress_bar(tmp_path, capsys):
    _run(tmp_path, "sample.progress=true", name="on")
    assert "SMC" in capsys.readouterr().err
    _run(tmp_path, "sample.progress=false", name="off")
    assert "SMC" not in capsys.readouterr().err


def test_compare_reverse_diffusion(tmp_path):
    """sample.compare_reverse_diffusion: the naive summed-score sampler's points are saved (and plotted); on the
    product it puts mass where the product has none (outside the strip's two ring modes)."""
    _, saved, _ = _run(tmp_path, "sample.compare_reverse_diffusion=true", "sample.num_particles=500", name="on")
    rd = saved["reverse_diffusion"]
    assert rd.shape == (500, 2) and torch.isfinite(rd).all()
    off_modes = ((rd[:, 1].abs() - 0.5).abs() > 0.2) | (rd[:, 0].abs() > 0.1)
    smc_off = ((saved["resampled"][:, 1].abs() - 0.5).abs() > 0.2) | (saved["resampled"][:, 0].abs() > 0.1)
    assert float(off_modes.double().mean()) > float(smc_off.double().mean())
    _, saved, _ = _run(tmp_path, "sample.compare_reverse_diffusion=false", name="off")
    assert "reverse_diffusion" not in saved


def test_plot_options(tmp_path, monkeypatch):
    """sample.plot.enabled writes samples.png / diagnostics.png; sample.plot.lim sets the 2D panels' extent."""
    figures = {}
    savefig = matplotlib.figure.Figure.savefig

    def capture(self, path, *a, **k):
        figures[Path(path).name] = self
        return savefig(self, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    _run(tmp_path, "sample.plot.enabled=true", "sample.plot.lim=0.8", "sample.compare_reverse_diffusion=true", name="on")
    assert (tmp_path / "on" / "samples.png").is_file() and (tmp_path / "on" / "diagnostics.png").is_file()
    axes = figures["samples.png"].axes
    assert len(axes) == 3  # target density, SMC, naive reverse diffusion
    assert all(ax.get_xlim() == (-0.8, 0.8) and ax.get_ylim() == (-0.8, 0.8) for ax in axes)
    _run(tmp_path, "sample.plot.enabled=false", name="off")
    assert not list((tmp_path / "off").glob("*.png"))


@pytest.mark.slow  # 18 s: island resampling is checked in-process by test_smc_distributed in the default suite
def test_island_resampling_under_torchrun(tmp_path):
    """sample.island=true under torchrun (WORLD_SIZE=2): two independent islands whose log Z are combined; no particle
    crosses ranks. (Global resampling under torchrun: tests/test_smc_distributed.py::test_cli_under_torchrun.)"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fkdiff.sample",
           *FAST, f"run_dir={tmp_path}", "sample.island=true", "sample.num_particles=400", "sample.num_levels=30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    assert diag["world_size"] == 2 and len(diag["island_log_Z"]) == 2
    isl = torch.tensor(diag["island_log_Z"], dtype=torch.float64)
    assert isl[0] != isl[1]
    assert diag["log_Z"] == pytest.approx(float(torch.logsumexp(isl, 0)) - math.log(2), abs=1e-9)
    exact = _exact_log_z_ring_strip(0.002)
    assert abs(diag["log_Z"] - exact) < 4 * diag["log_Z_se"] + 0.1, (diag["log_Z"], exact)
    assert torch.load(tmp_path / "samples.pt")["samples"].shape == (400, 2)


# which test covers each sample.* option (sample.models / target / students / num_particles: above as well)
OPTION_TESTS = {
    "models": "test_models_and_target_mixture", "target": "test_models_and_target_mixture",
    "students": "test_students_replace_analytic_models", "proposal": "test_proposal", "shape": "test_shape",
    "num_particles": "test_num_particles_num_levels_and_sigma_range",
    "num_levels": "test_num_particles_num_levels_and_sigma_range",
    "num_steps": "test_num_particles_num_levels_and_sigma_range",
    "budget": "test_budget_plans_levels_kernel_and_formulation",
    "sigma_max": "test_num_particles_num_levels_and_sigma_range",
    "sigma_min": "test_num_particles_num_levels_and_sigma_range",
    "mode": "test_mode_twisted_without_potentials_is_the_proposal", "temperature": "test_temperature_sharpens_mode_masses",
    "bounds": "test_bounds_zero_violations", "potentials": "test_potentials", "mcmc.kind": "test_mcmc_kernels", "mcmc.num_steps": "test_mcmc_options",
    "mcmc.num_leapfrog": "test_mcmc_options", "mcmc.step_size": "test_mcmc_options",
    "mcmc.target_accept": "test_mcmc_options", "mcmc.damping": "test_mcmc_options",
    "resample": "test_resample_scheme_is_used", "ess_threshold": "test_ess_threshold",
    "final_denoise": "test_final_denoise", "init_std": "test_init_std",
    "max_batch": "test_max_batch_chunks_without_changing_results", "device": "test_device_cpu",
    "island": "test_island_resampling_under_torchrun", "progress": "test_progress_bar",
    "compare_reverse_diffusion": "test_compare_reverse_diffusion", "plot.enabled": "test_plot_options",
    "plot.lim": "test_plot_options",
}


def test_every_sample_option_has_a_cli_test():
    """Every key of the `sample:` section (and of every sample/mcmc option) is in OPTION_TESTS, and its test exists."""
    keys = set()
    for kind in (*mcmc.KERNELS, "none"):  # every registered kernel has its sample/mcmc=<kind> config
        s = OmegaConf.to_container(compose(["recipe=toy2d", f"sample/mcmc={kind}"]).sample)
        for k, v in s.items():
            if isinstance(v, dict) and k in ("mcmc", "plot"):
                keys |= {f"{k}.{kk}" for kk in v}
            else:
                keys.add(k)
    missing = sorted(keys - set(OPTION_TESTS))
    assert not missing, f"sample options without a CLI test: {missing}"
    assert all(callable(globals().get(name)) for name in OPTION_TESTS.values())
