"""python -m fkdiff.sample: models + composition expression -> SMC -> files; checked against the exact answer."""

import json
import math

import pytest
import torch

from fkdiff.recipes import compose
from fkdiff.sample import build_mcmc, load_model, parse_expression, run
from teachers import ring8, strip


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


def test_cli_product_matches_exact_log_z(tmp_path):
    cfg = compose(["recipe=toy2d", f"run_dir={tmp_path}", "sample.num_particles=600", "sample.num_steps=60",
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
    t = parse_expression("mixture(a, tempered(b, 2.0), weights=[1, 3])", m)
    x = torch.zeros(4, 2, dtype=torch.float64)
    e = t.energy(x, 0.5)
    expect = -torch.logsumexp(torch.stack([math.log(0.25) - m["a"].energy(x, 0.5),
                                           math.log(0.75) - 2.0 * m["b"].energy(x, 0.5)]), 0)
    torch.testing.assert_close(e, expect)
    with pytest.raises(ValueError, match="unknown model 'c'"):
        parse_expression("product(a, c)", m)
    with pytest.raises(ValueError, match="unsupported syntax"):
        parse_expression("__import__('os')", m)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_expression("product(a,", m)


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown model kind"):
        load_model({"kind": "magic"})
    with pytest.raises(ValueError, match="needs `preset:`"):
        load_model({"kind": "analytic"})
    with pytest.raises(ValueError, match="unknown mcmc kind"):
        build_mcmc({"kind": "gibbs"})
    assert build_mcmc({"kind": "none"}) is None


def test_students_replace_analytic_models(tmp_path):
    """sample.students=<distill run> composes the distilled students (here untrained, saved as distill does)."""
    from fkdiff import load_energy
    from fkdiff.energy import build_student, save_student
    from fkdiff.sample import use_students

    run_dir = tmp_path / "runs" / "distill" / "2026-01-01_00-00-00"
    for preset in ("ring8", "strip"):
        st = build_student((2,), 0.5, "l2", backbone={"kind": "mlp", "width": 16, "num_blocks": 1})
        save_student(st, run_dir / preset / "student.pt")
    cfg = compose(["recipe=toy2d", f"run_dir={tmp_path / 'out'}", f"sample.students={run_dir}",
                   "sample.num_particles=64", "sample.num_steps=8", "sample.progress=false",
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
