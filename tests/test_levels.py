"""Energy levels across sigma (fkdiff.levels, fkdiff.distillation.level_loss / level_diagnostics, issue 9): the
teacher's time score is the heat equation, the level term vanishes exactly on the true energy up to a per-sigma constant
and moves a drifting level offset toward the truth, the diagnostics see level offsets the denoiser error misses (2D and
image-shaped teachers, with and without a teacher energy), the product check is exact on exact models."""

import math

import pytest
import torch

from fkdiff.distillation import (DenoiserMatchingLoss, LevelMatchingLoss, integrated_level_error_by_bucket, level_report,
                                  mode_offset_error_by_bucket, residual_by_bucket, teacher_regions,
                                  time_score_error_by_bucket)
from fkdiff.energy import build_student
from fkdiff.levels import (energy_grad_and_time_score, exact_log_overlap, product_check_2d, teacher_relative_energy,
                           teacher_time_score, time_score)
from teachers import GaussianMixture, gmm_product, ring8, strip


def _exact_time_score(teacher, x, sigma, h=1e-5):
    """sigma dE/dsigma of an analytic teacher's normalised energy by central differences in sigma."""
    return (teacher.energy(x, sigma * (1 + h)) - teacher.energy(x, sigma * (1 - h))) / (2 * h)


@pytest.mark.parametrize("teacher", [ring8(), strip()], ids=["ring8", "strip"])
def test_teacher_time_score_is_the_heat_equation(teacher, gen):
    """T = -(|D - x|^2 / sigma^2 + div D - d) equals sigma dE/dsigma of the exact normalised energy, eq. (2)."""
    x0 = teacher.sample(500, gen)
    sigma = torch.exp(torch.empty(500, dtype=torch.float64).uniform_(math.log(0.002), math.log(20.0), generator=gen))
    x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    exact = _exact_time_score(teacher, x, sigma)
    torch.testing.assert_close(teacher_time_score(teacher, x, sigma), exact, atol=1e-6, rtol=1e-6)
    # float32 inputs: the differences are still taken in the teacher's float64
    torch.testing.assert_close(teacher_time_score(teacher, x.float(), sigma.float()).double(), exact, atol=2e-3, rtol=1e-4)
    # Hutchinson (Rademacher) is unbiased: the mean over probes converges to the exact divergence
    hutch = torch.stack([teacher_time_score(teacher, x, sigma, divergence="hutchinson", generator=gen) for _ in range(64)])
    err = hutch.mean(0) - exact
    se = hutch.std(0) / 8 + 1e-9
    assert (err.abs() <= 5 * se).float().mean() > 0.99


def test_student_time_score_is_its_sigma_derivative(gen):
    # the noise embedding runs in float32: a smooth one (noise_scale 4) so that central differences in sigma resolve it
    st = build_student((2,), 0.5, "l2", backbone=dict(width=16, num_blocks=1, emb_dim=16, noise_scale=4.0))
    with torch.no_grad():
        for p in st.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    st = st.double()
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    sigma = torch.exp(torch.randn(64, generator=gen, dtype=torch.float64))
    e, gx, ts = energy_grad_and_time_score(st, x, sigma, create_graph=False)
    e_ref, gx_ref = st.energy_and_grad(x, sigma, create_graph=False)
    torch.testing.assert_close(e, e_ref)
    torch.testing.assert_close(gx, gx_ref)
    h = 1e-3
    fd = (st.energy(x, sigma * math.exp(h)) - st.energy(x, sigma * math.exp(-h))) / (2 * h)  # d/d ln sigma
    torch.testing.assert_close(ts, fd.detach(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(time_score(st, x, sigma, create_graph=False), ts)


class _Shifted(torch.nn.Module):
    """An analytic teacher's energy plus a per-sigma constant and an x-dependent drift of the levels in ln sigma:
    E + 5 ln sigma + 3 sigma + a ln(sigma) x_0 (a = `drift`, a learnable parameter)."""

    def __init__(self, teacher, drift: float = 0.0):
        super().__init__()
        self.t = teacher
        self.drift = torch.nn.Parameter(torch.tensor(float(drift), dtype=torch.float64))

    def energy(self, x, sigma, cond=None):
        s = sigma if torch.is_tensor(sigma) else torch.full((x.shape[0],), float(sigma), dtype=x.dtype)
        return self.t.energy(x, s) + 5.0 * s.log() + 3.0 * s + self.drift * s.log() * x[:, 0]


def test_level_term_vanishes_on_the_true_energy_up_to_a_per_sigma_constant(gen):
    teacher = ring8()
    x0 = teacher.sample(256, gen)
    loss = LevelMatchingLoss(teacher.sigma_data, weight=1.0, num_pairs=64)
    out = loss(_Shifted(teacher), teacher, x0, None, torch.Generator().manual_seed(0))
    assert out.level_loss.shape == (64,) and out.level_loss.max() < 1e-10
    assert out.loss.shape == (256,) and out.loss.max() < 1e-12  # the exact energy's denoiser is the teacher's
    # an x-dependent drift of the levels, E + a ln(sigma) x_0: q = a x_0, so the pair loss is a^2 (x_a0 - x_b0)^2 / 2
    out = loss(_Shifted(teacher, drift=0.7), teacher, x0, None, torch.Generator().manual_seed(0))
    sigma, eps = loss.draw_pairs(x0, torch.Generator().manual_seed(0))
    x = x0 + sigma[:, None] * eps
    expect = 0.5 * 0.49 * (x[:64, 0] - x[128:192, 0]) ** 2
    torch.testing.assert_close(out.level_loss, expect, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(out.x_noisy, x)
    # pairs share their sigma, log-uniform in [sigma_lo, sigma_hi]; the other rows keep the training law
    assert torch.equal(sigma[:64], sigma[128:192]) and out.level_sigma.min() >= 0.002 and out.level_sigma.max() <= 1.0
    plain, _ = DenoiserMatchingLoss(teacher.sigma_data).draw(x0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigma[64:128], plain[64:128])


def test_level_term_moves_a_drifting_offset_toward_the_truth(gen):
    """The projection loss cannot see a drift of the two modes' relative level along ln sigma (E + a ln(sigma) 1[x_0 >
    0]: zero gradient in x where the data are), the level term's gradient in a points to a = 0 from either side."""
    gmm = _two_modes()

    class Drift(torch.nn.Module):
        def __init__(self, a):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))

        def energy(self, x, sigma, cond=None):
            return gmm.energy(x, sigma) + self.a * sigma.log() * (x[:, 0] > 0).to(x.dtype)

    x0 = gmm.sample(256, gen)
    loss = LevelMatchingLoss(0.5, weight=1.0, sigma_hi=0.05)
    for a0 in (0.8, -0.8):
        model = Drift(a0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # d loss / d a = a P(pair straddles) / 2 ~ a / 4
        for k in range(10):
            out = loss(model, gmm, x0, None, torch.Generator().manual_seed(k))
            (out.loss.mean() + out.level_loss.mean()).backward()
            opt.step(), opt.zero_grad()
        assert abs(model.a.item()) < 0.1 * abs(a0), (a0, model.a.item())
    # without the level term a does not move: the projection loss is blind to the offset
    model = Drift(0.8)
    loss(model, gmm, x0, None, torch.Generator().manual_seed(0)).loss.mean().backward()
    assert model.a.grad is None or float(model.a.grad) == 0.0


def test_level_term_pairs_do_not_depend_on_the_process_count():
    loss = LevelMatchingLoss(0.5, num_pairs=8)
    x0 = torch.randn(32, 2)
    full_sigma, full_eps = loss.draw_pairs(x0, torch.Generator().manual_seed(3))
    for rank in range(2):
        sigma, eps = loss.draw_pairs(x0[rank::2], torch.Generator().manual_seed(3), (rank, 2))
        torch.testing.assert_close(eps, full_eps[rank::2])
        # rank r's pair rows i, 8 + i are global pairs r + 2i: the global rows (r + 2i, 16 + r + 2i)
        torch.testing.assert_close(sigma[:4], full_sigma[:8][rank::2])
        torch.testing.assert_close(sigma[8:12], full_sigma[16:24][rank::2])
    assert loss.global_pairs(32, 1) == 8 and LevelMatchingLoss(0.5).global_pairs(256, 1) == 64
    with pytest.raises(ValueError, match="even"):
        loss.draw_pairs(torch.randn(7, 2), torch.Generator())
    with pytest.raises(ValueError, match="multiple"):
        LevelMatchingLoss(0.5, num_pairs=7).draw_pairs(x0[0::2], torch.Generator(), (0, 2))
    with pytest.raises(ValueError, match="target=teacher"):
        LevelMatchingLoss(0.5, target="data")


def test_level_term_on_extra_rows_keeps_the_training_law():
    """rows="extra": the B rows keep the projection loss's own sigma law and noise, the 2P pair rows (x0 rows i and
    i + B/2) come after them with their own noise; the term still vanishes on the true energy up to a per-sigma
    constant, sees an x-dependent drift, and its noise does not depend on the process count."""
    teacher = ring8()
    x0 = teacher.sample(64, torch.Generator().manual_seed(0))
    loss = LevelMatchingLoss(teacher.sigma_data, weight=1.0, num_pairs=8, rows="extra")
    sigma, eps = loss.draw_pairs(x0, torch.Generator().manual_seed(0))
    plain_sigma, plain_eps = DenoiserMatchingLoss(teacher.sigma_data).draw(x0, torch.Generator().manual_seed(0))
    assert sigma.shape == (80,) and eps.shape == (80, 2)
    torch.testing.assert_close(sigma[:64], plain_sigma)
    torch.testing.assert_close(eps[:64], plain_eps)
    assert torch.equal(sigma[64:72], sigma[72:80]) and sigma[64:].min() >= 0.002 and sigma[64:].max() <= 1.0
    x0_rows, _ = loss.expand(x0, None)
    torch.testing.assert_close(x0_rows[64:], torch.cat([x0[:8], x0[32:40]]))
    out = loss(_Shifted(teacher), teacher, x0, None, torch.Generator().manual_seed(0))
    assert out.loss.shape == (64,) and out.level_loss.shape == (8,) and out.level_loss.max() < 1e-10
    torch.testing.assert_close(out.sigma, plain_sigma)
    torch.testing.assert_close(out.level_sigma, sigma[64:72])
    out = loss(_Shifted(teacher, drift=0.7), teacher, x0, None, torch.Generator().manual_seed(0))
    x = x0_rows + sigma[:, None] * eps
    torch.testing.assert_close(out.level_loss, 0.5 * 0.49 * (x[64:72, 0] - x[72:80, 0]) ** 2, atol=1e-8, rtol=1e-6)
    for rank in range(2):
        s_r, e_r = loss.draw_pairs(x0[rank::2], torch.Generator().manual_seed(0), (rank, 2))
        torch.testing.assert_close(s_r[32:], sigma[64:72][rank::2].repeat(2))
        torch.testing.assert_close(e_r[32:], torch.cat([eps[64:72][rank::2], eps[72:80][rank::2]]))
        x_r, _ = loss.expand(x0[rank::2], None, 2)  # rank r's pairs join its local rows i and 16 + i, i < 4
        torch.testing.assert_close(x_r[32:], torch.cat([x0[rank::2][:4], x0[rank::2][16:20]]))
    with pytest.raises(ValueError, match="rows must be shared or extra"):
        LevelMatchingLoss(0.5, rows="both")


class _Offset:
    """Exact energy of a mixture plus c on the half space x_0 > 0: exact denoiser, wrong mode masses."""

    def __init__(self, gmm, c, shape=None):
        self.gmm, self.c, self.shape = gmm, c, shape

    def energy(self, x, sigma, cond=None):
        z = x.flatten(1)
        return self.gmm.energy(z, sigma) + self.c * (z[:, 0] > 0).to(z.dtype)

    def __call__(self, x, sigma, cond=None):
        return self.gmm(x.flatten(1), sigma).reshape(x.shape)


def _two_modes(dim=2, thin: float | None = None):
    """Two modes at -e_0, +e_0; std 0.05, and `thin` along the dense direction (1, ..., 1)/sqrt(d) if given (then
    dD/dx has off-diagonal entries at sigma ~ thin and the Rademacher Hutchinson divergence is noisy)."""
    mu = torch.zeros(2, dim, dtype=torch.float64)
    mu[0, 0], mu[1, 0] = -1.0, 1.0
    cov = 0.05**2 * torch.eye(dim, dtype=torch.float64)
    if thin is not None:
        u = torch.full((dim, 1), dim**-0.5, dtype=torch.float64)
        cov = cov + (thin**2 - 0.05**2) * (u @ u.T)
    return GaussianMixture(mu, cov.expand(2, dim, dim))


def test_mode_offsets_and_integrated_levels_see_an_offset_the_time_score_cannot(gen):
    """c on one of two equal modes: offset rms = c/2, span = c; pair rms = c/sqrt(2) (the integrated estimate needs no
    teacher energy); the time score is exact (the offset does not change with sigma), so its error is 0."""
    gmm, c = _two_modes(), 1.0
    model = _Offset(gmm, c)
    x0 = gmm.sample(4000, gen)
    edges = [0.002, 0.01, 0.05]
    labels = teacher_regions(gmm, x0)
    assert sorted(labels.unique().tolist()) == [0, 1]
    off = mode_offset_error_by_bucket(model, gmm, x0, labels, edges, gen)
    assert all(abs(r - c / 2) < 0.01 for r in off["offset_rms"]) and all(abs(s - c) < 1e-9 for s in off["offset_span"])
    exact = mode_offset_error_by_bucket(gmm, gmm, x0, labels, edges, gen)
    assert max(exact["offset_rms"]) < 1e-9
    integ = integrated_level_error_by_bucket(model, gmm, x0[:400], edges, gen)  # 200 pairs: P(straddle) se 0.035
    assert all(abs(r - c / math.sqrt(2)) < 0.1 for r in integ["rms"]), integ
    assert max(integrated_level_error_by_bucket(gmm, gmm, x0[:400], edges, gen)["rms"]) < 1e-3
    ts = time_score_error_by_bucket(model, gmm, x0[:400], edges, gen)
    assert max(ts["rms"]) < 1e-5 and min(ts["target_rms"]) > 0


def test_teacher_relative_energy_from_the_denoiser_alone(gen):
    for teacher in (ring8(), strip()):
        x0 = teacher.sample(200, gen)
        sig = torch.full((100,), 0.003, dtype=torch.float64)
        x = x0 + 0.003 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        est = teacher_relative_energy(teacher, x[:100], x[100:], sig, num_sigma_nodes=32)
        exact = teacher.energy(x[:100], sig) - teacher.energy(x[100:], sig)
        assert (est - exact).abs().max() < 1e-3


def test_image_shaped_level_diagnostics_with_hutchinson(gen):
    """The diagnostics image students get (no teacher energy; d = 16 > 8, so Hutchinson divergence, cross-fitted): an
    exact student has zero time-score error, and the offset student's relative-energy error c/sqrt(2) is found."""
    shape = (1, 4, 4)
    gmm, c = _two_modes(16, thin=0.004), 1.0
    teacher = _Offset(gmm, 0.0, shape)  # image-shaped exact denoiser
    x0 = gmm.sample(400, gen).reshape(-1, *shape)
    edges = [0.002, 0.01, 0.05]
    ts = time_score_error_by_bucket(_Offset(gmm, 0.0, shape), teacher, x0, edges, gen, num_probes=2)
    assert ts["divergence"] == "hutchinson" and max(ts["rms"]) < 0.3 and min(ts["noise_rms"]) > 0, ts
    # 200 pairs, 8 probes: probe noise ~0.55 nats per pair (noise_rms), cross-fitted away. The estimate of rms^2 has
    # sd ~ (rms^2 + noise^2) / sqrt(200): 4 sd is 0.23 at rms^2 = 0.5 (|rms - 0.707| < 0.15) and 0.085 at rms = 0
    # (rms < 0.3). Measured over 3 seeds with the offset: 0.697-0.705.
    kw = dict(num_probes=8, num_sigma_nodes=12, sigma_ref=0.5)
    integ = integrated_level_error_by_bucket(_Offset(gmm, c, shape), teacher, x0, edges[:2], gen, **kw)
    assert abs(integ["rms"][0] - c / math.sqrt(2)) < 0.15 and integ["noise_rms"][0] > 0.2, integ
    assert integrated_level_error_by_bucket(teacher, teacher, x0, edges[:2], gen, **kw)["rms"][0] < 0.3
    # what distillation reports for an image student (fkdiff.distill: distill.eval.*)
    rep = level_report(teacher, teacher, x0[:8], edges, gen, num_probes=1, integrated=True, integrated_samples=4,
                       num_sigma_nodes=4)
    assert set(rep) == {"time_score", "integrated", "residual"} and len(rep["integrated"]["rms"]) == len(edges) - 1


def test_product_check_is_exact_on_exact_models_and_sees_a_level_offset():
    ring, band = ring8(), strip()
    res = product_check_2d([ring, band], [ring, band], 0.002, h=0.005)
    assert abs(res["exact_region_mass"] - 0.5) < 1e-9
    assert abs(res["region_mass_error"]) < 1e-6 and abs(res["log_overlap_error"]) < 1e-3
    assert abs(res["exact_log_overlap_grid"] - res["exact_log_overlap"]) < 1e-3

    class Upper:  # the strip with its upper half raised by log 3: the product's upper cluster gets 1/4
        def energy(self, x, sigma):
            return band.energy(x, sigma) + math.log(3.0) * (x[:, 1] > 0).to(x.dtype)

    res = product_check_2d([ring, Upper()], [ring, band], 0.002, h=0.005)
    assert abs(res["region_mass"] - 0.25) < 1e-3
    # closed forms: GMM x GMM agrees with gmm_product, GMM x Box with the grid
    g2 = ring8(radius=0.3)
    assert exact_log_overlap(ring, g2, 0.1) == pytest.approx(gmm_product(ring, g2, 0.1)[1])


def test_box_teacher_asymmetry_is_finite(gen):
    """Autograd through the Box's closed-form score is NaN far outside the box at small sigma; the diagnostic goes
    through its energy (the same denoiser to ~1e-13) and reports ~0 for this conservative teacher."""
    from fkdiff.distillation import teacher_asymmetry

    band = strip()
    x0 = band.sample(500, gen)
    for s in (0.002, 0.01, 1.0):
        sig = torch.full((500,), s, dtype=torch.float64)
        x = x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        asym, scale = teacher_asymmetry(band, x, sig, generator=gen)
        assert torch.isfinite(asym).all() and torch.isfinite(scale).all()
        assert (asym <= 1e-20 * scale + 1e-30).all()
    res = residual_by_bucket(band, band, x0.float(), [0.002, 0.01, 1.0], gen)
    assert all(math.isfinite(a) for a in res["asymmetry_rel"]) and max(res["residual"]) < 1e-10


# ------------------------------------------------------------------------------------------- distillation


class _Rotated:
    """A non-conservative teacher: ring8's score plus r = alpha R s with R the 90-degree rotation. div(p_sigma r) =
    p (s . r + div r) = 0 (s . R s = 0; div(R s) = tr(R J) = 0 for J symmetric, R antisymmetric), so r is exactly the
    part no energy can represent and the projection's answer is ring8 itself. Denoiser D + sigma^2 r."""

    def __init__(self, base, alpha):
        self.base, self.alpha = base, alpha
        self.sigma_data, self.sigma_min, self.sigma_max = base.sigma_data, base.sigma_min, base.sigma_max
        self.rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)

    def sample(self, n, generator=None):
        return self.base.sample(n, generator)

    def rotational(self, x, sigma):
        """sigma^2 r(x) `[B, 2]` (denoiser units)."""
        s = sigma if torch.is_tensor(sigma) else torch.full((x.shape[0],), float(sigma))
        return (s.double()[:, None] ** 2 * self.alpha * self.base.score(x.double(), s.double()) @ self.rot.T).to(x.dtype)

    def __call__(self, x, sigma, cond=None):
        return self.base(x, sigma) + self.rotational(x, sigma)


def test_non_conservative_teacher_is_projected_and_the_residual_reports_r(tmp_path):
    """Distilling ring8 + a rotational field r returns ring8's denoiser where the loss has weight (sigma >= 0.2), and
    there the residual against the teacher equals |sigma^2 r|^2 / d (and its excess over the exactly conservative
    ring8 does too: D_theta - D_ring8 is L2(p_sigma)-orthogonal to r at the projection); the asymmetry sees r."""
    from torch.utils.data import DataLoader

    from fkdiff.distillation import DistillationModule, StepBatches, denoiser_error_by_bucket
    from fkdiff.training import build_trainer

    torch.manual_seed(0)
    base = ring8()
    teacher = _Rotated(base, alpha=1.0)
    data = base.sample(8192, torch.Generator().manual_seed(0)).float()
    st = build_student((2,), base.sigma_data, "l2", backbone=dict(width=64, num_blocks=2))
    module = DistillationModule(st, teacher, DenoiserMatchingLoss(base.sigma_data, p_mean=-1.0, p_std=1.2), lr=2e-3,
                                warmup_steps=50, seed=0)
    loader = DataLoader(StepBatches([{"x": x} for x in data], 256, seed=0), batch_size=None)
    trainer = build_trainer({"max_steps": 400, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                             "num_sanity_val_steps": 0,
                             "limit_val_batches": 0, "inference_mode": False, "gradient_clip_val": 1.0,
                             "enable_model_summary": False}, tmp_path, logger=None, ema_decay=0.99)
    trainer.fit(module, train_dataloaders=loader)
    st.eval()
    edges = [0.2, 1.0, 5.0]
    g = torch.Generator().manual_seed(1)
    x0 = base.sample(4096, g).float()
    res = residual_by_bucket(st, teacher, x0, edges, torch.Generator().manual_seed(2), control=(st, base))
    to_cons = denoiser_error_by_bucket(st, base, x0, edges, torch.Generator().manual_seed(2))
    # |sigma^2 r|^2 / d on the same (x, sigma) draws as residual_by_bucket
    g2 = torch.Generator().manual_seed(2)
    rot = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        u = torch.rand(x0.shape[0], generator=g2, dtype=torch.float64)
        sig = (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp().float()
        x = x0 + sig[:, None] * torch.randn(x0.shape, generator=g2)
        rot.append(float(teacher.rotational(x, sig).pow(2).sum(1).mean() / 2))
    for i in range(len(edges) - 1):
        assert to_cons["excess"][i] < 0.05 * 2 * rot[i], (to_cons, rot)       # projected onto the conservative part
        assert abs(res["residual"][i] - rot[i]) < 0.1 * rot[i], (res, rot)     # the residual reports r
        assert abs(res["excess_residual"][i] - rot[i]) < 0.1 * rot[i], (res, rot)
        assert res["asymmetry_rel"][i] > 0.1


@pytest.mark.parametrize("recipe", ["toy2d", "digits"])  # the image recipes share config.yaml's distill.levels
def test_the_toy2d_recipe_trains_with_the_level_term_images_opt_in_and_it_switches_off(recipe):
    """toy2d: the level term by default (it wins there on 3 seeds); image recipes: off by default (on the digits_small
    student it made the small-sigma relative energies worse, README), on with distill.levels.weight=0.1."""
    from omegaconf import OmegaConf

    from fkdiff.distill import build_loss
    from fkdiff.recipes import compose

    cfg = compose([f"recipe={recipe}"])
    if recipe != "toy2d":
        assert type(build_loss(cfg.distill, 0.5)) is DenoiserMatchingLoss
        cfg = compose([f"recipe={recipe}", "distill.levels.weight=0.1"])
    loss = build_loss(cfg.distill, 0.5)
    assert isinstance(loss, LevelMatchingLoss) and loss.level_weight == 0.1 and loss.law.lo == 0.002
    assert loss.global_pairs(int(cfg.data.batch_size), 1) == int(cfg.data.batch_size) // 4
    assert loss.rows == ("extra" if recipe == "toy2d" else "shared")  # toy2d: the batch keeps its sigma law
    for key, value in (("levels.weight", 0), ("target", "data")):  # the off switch; E-DSM stays plain E-DSM
        off = OmegaConf.to_container(cfg.distill, resolve=True)
        OmegaConf.update(off := OmegaConf.create(off), key, value)
        assert type(build_loss(off, 0.5)) is DenoiserMatchingLoss
    assert (cfg.student.backbone or {}).get("noise_scale") == (16 if recipe == "toy2d" else None)


class _DriftingStudent(torch.nn.Module):
    """Two modes' exact energy (scaled by s, at its optimum 1) plus a drift of their relative level along ln sigma,
    a ln(sigma) 1[x_0 > 0]: grad_x of the drift is zero where the data are, so the projection loss cannot see a, yet
    at sigma_min = 0.002 it shifts the modes' levels by a ln(0.002) = -6.2 a nats (SMC's mode masses by exp of it)."""

    def __init__(self, gmm, a: float):
        super().__init__()
        self.gmm, self.sigma_data, self.config = gmm, 0.5, {}  # config: what a checkpoint records of a student
        self.scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def energy(self, x, sigma, cond=None):
        s = sigma.double() if torch.is_tensor(sigma) else torch.full((x.shape[0],), float(sigma), dtype=torch.float64)
        e = self.scale * self.gmm.energy(x.double(), s) + self.a * s.log() * (x[:, 0] > 0).double()
        return e.to(x.dtype)

    def forward(self, x, sigma, cond=None):
        _, grad, _ = energy_grad_and_time_score(self, x, sigma, create_graph=torch.is_grad_enabled())
        return x - sigma[:, None] ** 2 * grad


@pytest.mark.parametrize("recipe_default", [True, False], ids=["default", "without_level_term"])
def test_distillation_pins_the_mode_levels_the_projection_loss_cannot_see(recipe_default, tmp_path):
    """Distillation with the default recipe's loss (the level term) corrects a drift of two modes' relative level that
    today's loss (distill.levels.weight=0) cannot see: its gradient in a is exactly zero, and the level error at
    sigma_min stays 6.2 a = 1.9 nats. The Lightning training loop of fkdiff.distill; 60 steps of 64 rows, a 2-parameter
    student (10 without the term: its gradient in a is zero from the first step)."""
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from fkdiff.distill import build_loss
    from fkdiff.distillation import DistillationModule, StepBatches
    from fkdiff.recipes import compose
    from fkdiff.training import build_trainer

    gmm = _two_modes()
    dcfg = compose(["recipe=toy2d"]).distill
    if not recipe_default:
        dcfg = OmegaConf.merge(dcfg, {"levels": {"weight": 0}})
    loss = build_loss(dcfg, 0.5)
    student = _DriftingStudent(gmm, a=0.3)
    module = DistillationModule(student, gmm, loss, lr=1e-2, warmup_steps=0, seed=0)
    data = gmm.sample(4096, torch.Generator().manual_seed(0)).float()
    loader = DataLoader(StepBatches([{"x": x} for x in data], 64, seed=0), batch_size=None)
    steps = 60 if recipe_default else 10
    trainer = build_trainer({"max_steps": steps, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                             "num_sanity_val_steps": 0, "limit_val_batches": 0, "inference_mode": False,
                             "enable_model_summary": False}, tmp_path, logger=None, checkpoint_every_n_steps=steps)
    trainer.fit(module, train_dataloaders=loader)
    level_error = abs(student.a.item() * math.log(0.002))  # nats between the modes at sigma_min
    if recipe_default:
        assert level_error < 0.2, student.a.item()
        assert isinstance(loss, LevelMatchingLoss)
    else:  # today's distillation: blind to the drift (this is the failure the level term fixes)
        assert type(loss) is DenoiserMatchingLoss and student.a.item() == 0.3 and level_error > 1.8
