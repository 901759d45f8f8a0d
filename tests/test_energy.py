"""Energy students (DESIGN.md section 3): conservative, exact Gaussian denoiser at g = 0, preconditioning identity,
graph only when training, protocols, warm start, save / load_energy."""

import pytest
import torch

import fkdiff
from fkdiff.diffusion import edm_precond
from fkdiff.energy import G_KINDS, EnergyStudent, build_student, load_energy, save_student, warm_start_from
from fkdiff.protocols import Denoiser, EnergyModel

MLP = dict(width=16, num_blocks=2, emb_dim=16)
UNET = dict(channels=(4, 8), emb_dim=16)



def _randomize(student: EnergyStudent, gen: torch.Generator, scale: float = 0.3) -> EnergyStudent:
    """Give every parameter (the zero-initialised output layer too) a random value, so g is far from 0."""
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return student


@pytest.mark.parametrize("g", G_KINDS)
def test_score_jacobian_is_symmetric_mlp(g, gen):
    st = _randomize(build_student((3,), 0.7, g, backbone=MLP).double(), gen).eval()
    x = torch.randn(3, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.4], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: st.score(z[None], sigma, create_graph=True)[0], x)
    off_gauss = jac + torch.eye(3, dtype=torch.float64) / (0.4**2 + 0.7**2)  # minus the Gaussian term's -I/(s^2+sd^2)
    assert off_gauss.abs().max() > 1e-3  # a non-trivial field
    assert (jac - jac.T).abs().max() <= 1e-10 * jac.abs().max()


@pytest.mark.parametrize("g", G_KINDS)
def test_score_jacobian_is_symmetric_unet(g, gen):
    """u^T J v = v^T J u for random probes (J = d score / dx at a 1x4x4 image, by two vector-Jacobian products)."""
    st = _randomize(build_student((1, 4, 4), 0.7, g, backbone=UNET).double(), gen).eval()
    x = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    score = st.score(x, torch.tensor([0.3, 1.5], dtype=torch.float64), create_graph=True)
    for _ in range(3):
        u, v = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(2))
        (jt_u,) = torch.autograd.grad((score * u).sum(), x, retain_graph=True)
        (jt_v,) = torch.autograd.grad((score * v).sum(), x, retain_graph=True)
        lhs, rhs = (jt_u * v).flatten(1).sum(1), (jt_v * u).flatten(1).sum(1)  # v^T J^T u and u^T J^T v
        gauss = -(u * v).flatten(1).sum(1) / (torch.tensor([0.3, 1.5], dtype=torch.float64) ** 2 + 0.49)
        assert ((lhs - gauss).abs() > 1e-4).all()  # a non-trivial field
        torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("g", G_KINDS)
def test_g_zero_is_the_exact_gaussian_denoiser(g, gen):
    from teachers import gaussian

    sd = 0.8
    st = build_student((2,), sd, g, backbone=MLP).double()
    if g == "l2":  # the only head that does not start at g = 0 (see fkdiff.energy): zero its output layer
        torch.nn.init.zeros_(st.f.out[-1].weight)
    exact = gaussian([0.0, 0.0], sd**2)
    x = 3 * torch.randn(64, 2, generator=gen, dtype=torch.float64)
    sigma = torch.exp(torch.linspace(-6, 4, 64, dtype=torch.float64))
    torch.testing.assert_close(st(x, sigma), exact(x, sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.score(x, sigma), exact.score(x, sigma), rtol=1e-12, atol=1e-12)
    # the energy is -log N(x; 0, (sd^2 + sigma^2) I) up to a constant per sigma
    e_diff = st.energy(x, sigma) - exact.energy(x, sigma)
    e_diff2 = st.energy(0.5 * x, sigma) - exact.energy(0.5 * x, sigma)
    torch.testing.assert_close(e_diff, e_diff2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("g", G_KINDS)
def test_denoiser_is_c_skip_x_minus_c_out_grad_g(g, gen):
    sd = 0.5
    st = _randomize(build_student((3,), sd, g, backbone=MLP).double(), gen).eval()
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    sigma = torch.exp(torch.randn(8, generator=gen, dtype=torch.float64))
    pc = edm_precond(sigma, sd)
    u = (pc.c_in[:, None] * x).requires_grad_(True)
    (grad_g,) = torch.autograd.grad(st.g(u, pc.c_noise).sum(), u)
    torch.testing.assert_close(st(x, sigma), pc.c_skip[:, None] * x - pc.c_out[:, None] * grad_g)
    e, sc = st.energy_and_score(x, sigma)
    torch.testing.assert_close(e, st.energy(x, sigma))
    torch.testing.assert_close(sc, st.score(x, sigma))
    # and D = x + sigma^2 score (Tweedie with the student's own score)
    torch.testing.assert_close(st(x, sigma), x + sigma[:, None] ** 2 * st.score(x, sigma))


def test_graph_only_when_training(gen):
    st = _randomize(build_student((2,), 0.5, "ip", backbone=MLP), gen)
    x = torch.randn(4, 2, generator=gen)
    st.train()
    d = st(x, 0.3)
    assert d.requires_grad
    d.sum().backward()  # second-order: reaches the weights through grad_x E
    assert all(p.grad is not None for p in st.f.out.parameters())
    with torch.no_grad():
        assert not st(x, 0.3).requires_grad  # no graph under no_grad, but the score is still computed
    st.eval()
    out = st(x, 0.3)
    assert not out.requires_grad and torch.isfinite(out).all()


def test_protocols_and_dtype(gen):
    st = build_student((2,), 0.5, "l2", backbone=MLP).eval()
    assert isinstance(st, Denoiser) and isinstance(st, EnergyModel)
    x = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    assert st(x, 0.1).dtype == torch.float64 and st.energy(x, 0.1).shape == (5,)
    with pytest.raises(ValueError, match="event dim"):
        st.energy(torch.randn(5, 2, 1), 0.1)
    with pytest.raises(ValueError, match="unknown energy head"):
        build_student((2,), 0.5, "nope")


def test_conditional_student_uses_null_token(gen):
    st = _randomize(build_student((1, 4, 4), 0.5, "l2", backbone=UNET, cond_kind="class", num_classes=3), gen).eval()
    x = torch.randn(3, 1, 4, 4, generator=gen)
    e_null = st.energy(x, 0.5)
    torch.testing.assert_close(st.energy(x, 0.5, torch.tensor([-1, -1, -1])), e_null)
    assert not torch.allclose(st.energy(x, 0.5, torch.tensor([0, 1, 2])), e_null)


def test_warm_start_copies_matching_teacher_backbone(gen):
    from teachers import EDMDenoiser

    teacher = EDMDenoiser.build((2,), sigma_data=0.5, backbone=MLP)
    _randomize(teacher, gen)
    st = build_student((2,), 0.5, "ip", backbone=MLP)
    assert warm_start_from(st, teacher)
    for (k, a), b in zip(st.f.state_dict().items(), teacher.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    other = build_student((2,), 0.5, "ip", backbone=dict(MLP, width=8))
    assert not warm_start_from(other, teacher)
    with pytest.raises(ValueError, match="differ"):
        warm_start_from(other, teacher, strict=True)
    assert not warm_start_from(st, object())


def test_save_and_load_energy(tmp_path, gen):
    st = _randomize(build_student((2,), 0.6, "dae", backbone=MLP), gen).eval()
    path = save_student(st, tmp_path / "run" / "ring8" / "student.pt")
    save_student(st, tmp_path / "run" / "strip" / "student.pt")
    x = torch.randn(6, 2, generator=gen)
    for loaded in (load_energy(path), fkdiff.load_energy(tmp_path / "run", device="cpu", name="ring8"),
                   load_energy(tmp_path / "run" / "ring8")):
        assert not loaded.training
        torch.testing.assert_close(loaded.energy(x, 0.2), st.energy(x, 0.2))
        torch.testing.assert_close(loaded.score(x, 0.2), st.score(x, 0.2))
        torch.testing.assert_close(loaded(x, 0.2), st(x, 0.2))
    with pytest.raises(ValueError, match="several students .*ring8.*strip"):
        load_energy(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        load_energy(tmp_path / "nothing")


@pytest.mark.gpu
def test_load_energy_on_cuda(tmp_path, gen):
    st = _randomize(build_student((2,), 0.6, "l2", backbone=MLP), gen).eval()
    loaded = load_energy(save_student(st, tmp_path / "student.pt"), device="cuda")
    x = torch.randn(6, 2, generator=gen)
    torch.testing.assert_close(loaded(x.cuda(), 0.2).cpu(), st(x, 0.2), rtol=1e-4, atol=1e-5)
