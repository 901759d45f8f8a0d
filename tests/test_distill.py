"""Distillation (DESIGN.md section 4): the loss and its E-DSM switch, diagnostics, convergence to the exact denoiser of
an analytic teacher, exact resume after a real kill, DDP on two CPU processes, W&B offline files, every recipe."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fkdiff.distill import distill
from fkdiff.distillation import DenoiserMatchingLoss, StepBatches, denoiser_error_by_bucket, teacher_asymmetry
from fkdiff.energy import build_student, load_energy
from fkdiff.recipes import available_recipes, compose

ROOT = Path(__file__).resolve().parents[1]
TINY_MLP = ["student.backbone.width=16", "student.backbone.num_blocks=1", "+student.backbone.emb_dim=16"]
FAST = ["recipe=toy2d", "logger.kind=none", "trainer.enable_progress_bar=false", "teacher.preset=[ring8]",
        "distill.plot.enabled=false", "distill.eval.enabled=false", "distill.diagnostics_every_n_steps=0",
        "distill.val_every_n_steps=100000", *TINY_MLP, "data.batch_size=64", "data.num_samples=4096",
        "distill.num_threads=1", "+trainer.enable_model_summary=false"]



def _weights(path) -> dict:
    return {k: v.clone() for k, v in load_energy(path).state_dict().items()}


def _assert_same_weights(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


# ------------------------------------------------------------------------------------------------------ loss


def test_edsm_switch_changes_only_the_target(gen):
    from teachers import ring8

    teacher = ring8()
    st = build_student((2,), teacher.sigma_data, "ip", backbone=dict(width=16, num_blocks=1))
    with torch.no_grad():
        for p in st.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    x0 = teacher.sample(32, gen).float()
    outs = {}
    for target in ("teacher", "data"):
        fn = DenoiserMatchingLoss(teacher.sigma_data, target=target)
        outs[target] = fn(st, teacher, x0, None, torch.Generator().manual_seed(7))
    t, d = outs["teacher"], outs["data"]
    for field in ("sigma", "x_noisy", "denoised"):  # same noise levels, same noise, same student output
        torch.testing.assert_close(getattr(t, field), getattr(d, field))
    torch.testing.assert_close(t.target, teacher(t.x_noisy, t.sigma))
    torch.testing.assert_close(d.target, x0)
    for o in (t, d):
        lam = (o.sigma**2 + teacher.sigma_data**2) / (o.sigma * teacher.sigma_data) ** 2
        torch.testing.assert_close(o.loss, lam * ((o.denoised - o.target) ** 2).sum(1))
    assert not torch.allclose(t.loss, d.loss)
    # through the config: only DenoiserMatchingLoss.target differs
    cfg_t, cfg_d = compose(FAST), compose(FAST + ["distill.target=data"])
    assert cfg_t.distill.target == "teacher" and cfg_d.distill.target == "data"
    cfg_d.distill.target = "teacher"
    assert cfg_d == cfg_t


def test_global_noise_and_batches_do_not_depend_on_world_size(gen):
    fn = DenoiserMatchingLoss(0.5)
    x0 = torch.randn(8, 2, generator=gen)
    s_full, e_full = fn.draw(x0, torch.Generator().manual_seed(3))
    for rank in range(2):
        s, e = fn.draw(x0[rank::2], torch.Generator().manual_seed(3), shard=(rank, 2))
        torch.testing.assert_close(s, s_full[rank::2])
        torch.testing.assert_close(e, e_full[rank::2])
    data = [{"x": torch.tensor([float(i)])} for i in range(20)]
    one = StepBatches(data, 4, seed=5, start_step_fn=lambda: 0)
    two = [StepBatches(data, 4, seed=5, start_step_fn=lambda: 0, rank=r, world_size=2) for r in range(2)]
    it1, it2 = iter(one), [iter(b) for b in two]
    seen = []
    for _ in range(10):  # two epochs of 5 steps: each epoch a permutation
        full = next(it1)["x"][:, 0]
        parts = [next(i)["x"][:, 0] for i in it2]
        torch.testing.assert_close(torch.stack(parts, 1).reshape(-1), full)
        seen.append(full)
    assert sorted(torch.cat(seen[:5]).tolist()) == list(range(20))
    resumed = iter(StepBatches(data, 4, seed=5, start_step_fn=lambda: 7))
    torch.testing.assert_close(next(resumed)["x"][:, 0], seen[7])


def test_teacher_asymmetry_hutchinson(gen):
    from teachers import ring8

    x = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    sigma = torch.exp(torch.randn(4000, generator=gen, dtype=torch.float64))
    asym, scale = teacher_asymmetry(ring8(), x, sigma, generator=gen)
    assert (asym <= 1e-18 * scale + 1e-20).all()  # the exact GMM score is a gradient
    m = torch.tensor([[-1.0, 0.7], [-0.7, -1.0]], dtype=torch.float64)  # score M x: J = M, |J - J^T|_F^2 = 4 * 0.49 * 2

    def rotational(z, s):
        return z + s[:, None] ** 2 * (z @ m.T)

    asym, scale = teacher_asymmetry(rotational, x, sigma, generator=gen)
    exact = float(((m - m.T) ** 2).sum())
    assert abs(asym.mean().item() - exact) < 0.1 * exact
    assert abs(scale.mean().item() - float((m**2).sum())) < 0.1 * float((m**2).sum())


# ----------------------------------------------------------------------------------------------- convergence


def test_distillation_approaches_the_exact_denoiser_per_sigma_bucket(tmp_path):
    """ring8 (8 Gaussians, std 0.05): after 400 steps the excess error over the exact denoiser is < 15% of the
    optimal denoising error in every sigma bucket, and at least 4x below the g = 0 (Gaussian) start in the hard one."""
    edges = [0.002, 0.02, 0.2, 2.0, 80.0]
    cfg = compose(FAST + [f"run_dir={tmp_path}", "student.backbone.width=64", "student.backbone.num_blocks=2",
                          "data.batch_size=256", "distill.max_steps=400", "distill.ema_decay=0.99",
                          "distill.p_mean=-2.0", "distill.p_std=1.6", f"distill.sigma_buckets={edges}",
                          "distill.eval.enabled=true", "distill.eval.num_samples=2048"])
    (run,) = distill(cfg)
    ratio = run["errors"]["ratio"]
    start = build_student((2,), run["teacher"].sigma_data, "ip")  # g = 0: the Gaussian denoiser the student starts at
    g = torch.Generator().manual_seed(1)
    x0 = run["teacher"].sample(2048, generator=g).float()
    ratio0 = denoiser_error_by_bucket(start, run["teacher"], x0, edges, g)["ratio"]
    assert max(ratio) < 0.15, ratio
    assert ratio[1] < ratio0[1] / 4, (ratio, ratio0)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "report.json").is_file()
    report = json.loads((tmp_path / "report.json").read_text())["students"]["ring8"]
    gap = report["energy_errors"]["rms_nats"]  # relative energies: accurate where the modes overlap (sigma >= 0.2)
    assert len(gap) == len(edges) - 1 and all(g >= 0 for g in gap) and max(gap[2:]) < 0.1, gap


# ---------------------------------------------------------------------------------------------------- resume


def _ckpt_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # missing or being written
        return None


@pytest.mark.slow  # 16 s: tests/test_resume.py kills the default recipe in each student in the default suite
def test_resume_after_kill_is_exact(tmp_path):
    every = 25
    common = FAST + [f"distill.checkpoint_every_n_steps={every}"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fkdiff.distill", *common, f"run_dir={killed}",
                             "distill.max_steps=1000000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = killed / "ring8" / "checkpoints" / "last.ckpt"
    deadline, step = time.time() + 90, None
    try:
        while time.time() < deadline and proc.poll() is None:
            step = _ckpt_step(last)
            if step is not None and step >= 2 * every:
                break
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no clean-up, no final checkpoint
    finally:
        proc.wait(timeout=30)
    assert step is not None and step >= 2 * every, proc.stderr.read().decode()[-3000:]
    assert _ckpt_step(last) == step  # the kill lost only the steps after the last checkpoint
    total = step + 15
    resumed = distill(compose(common + [f"run_dir={killed}", f"distill.max_steps={total}", "distill.ckpt_path=last"]))
    reference = distill(compose(common + [f"run_dir={tmp_path / 'ref'}", f"distill.max_steps={total}"]))
    assert resumed[0]["step"] == reference[0]["step"] == total
    # EMA weights (student.pt) and the raw weights + optimizer (last.ckpt) are those of the uninterrupted run
    _assert_same_weights(_weights(resumed[0]["student_path"]), _weights(reference[0]["student_path"]))
    a = torch.load(resumed[0]["checkpoint"], map_location="cpu", weights_only=False)
    b = torch.load(reference[0]["checkpoint"], map_location="cpu", weights_only=False)
    _assert_same_weights(a["current_model_state"], b["current_model_state"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for k in sa:
        torch.testing.assert_close(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])


# ------------------------------------------------------------------------------------------------------- DDP


def test_ddp_two_cpu_processes_match_one(tmp_path):
    """`trainer.devices=2 trainer.strategy=ddp` (gloo) through the real entry point; the global batch and its noise do
    not depend on the process count, so 2 processes x 32 rows give the weights of 1 process x 64 rows."""
    common = FAST + ["distill.max_steps=8", "distill.checkpoint_every_n_steps=8"]
    res = subprocess.run([sys.executable, "-m", "fkdiff.distill", *common, f"run_dir={tmp_path / 'ddp'}",
                          "trainer.devices=2", "trainer.strategy=ddp"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MEMBER: 2/2" in res.stdout + res.stderr
    (single,) = distill(compose(common + [f"run_dir={tmp_path / 'one'}"]))
    _assert_same_weights(_weights(tmp_path / "ddp" / "ring8" / "student.pt"), _weights(single["student_path"]),
                         rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- W&B, plots


def test_wandb_offline_run_files_and_validation_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(FAST + [f"run_dir={tmp_path}", "logger.kind=wandb", "logger.mode=offline", "distill.max_steps=4",
                          "distill.val_every_n_steps=4", "distill.plot.enabled=true", "distill.plot.num_steps=3",
                          "distill.plot.num_samples=64", "distill.plot.grid=20", "distill.diagnostics_every_n_steps=2",
                          "distill.eval.enabled=true", "distill.eval.num_samples=256"])
    distill(cfg)
    runs = list((tmp_path / "ring8" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((tmp_path / "ring8").rglob("*"))
    assert list((tmp_path / "ring8" / "plots").glob("samples_step*.png"))
    assert (tmp_path / "densities.png").is_file()


# --------------------------------------------------------------------------------------------------- recipes


IMAGE_DATA = {"shapes": ["data.num_samples=64"], "digits": []}  # cifar10 (a public teacher): tests/test_cifar10.py


@pytest.mark.parametrize("recipe", sorted(IMAGE_DATA))
def test_image_recipes_distil_a_small_teacher(recipe, tmp_path):
    from fkdiff.training import build_datamodule_from_config
    from teachers import EDMDenoiser, save_teacher

    assert set(IMAGE_DATA) | {"toy2d", "cifar10"} <= set(available_recipes())
    extra = IMAGE_DATA[recipe]
    base = [f"recipe={recipe}", f"run_dir={tmp_path / 'run'}", "logger.kind=csv", "trainer.enable_progress_bar=false",
            "data.batch_size=8", "distill.max_steps=2", "distill.val_every_n_steps=2", "distill.plot.num_steps=2",
            "distill.plot.num_samples=4", "distill.plot.val_examples=8", "distill.diagnostics_every_n_steps=1",
            "distill.num_threads=1", "distill.eval.level_samples=4", "distill.eval.num_probes=1",
            "distill.eval.integrated=false", *extra]  # the integrated level error is tested in test_levels.py
    with pytest.raises(FileNotFoundError, match=f"python -m teachers.train recipe={recipe}"):
        distill(compose(base))  # no teacher.path: says what to run
    cfg = compose(base)
    dm = build_datamodule_from_config(cfg.data)
    teacher = EDMDenoiser.build(dm.event_shape, sigma_data=dm.sigma_data, cond_kind=dm.cond_kind,
                                num_classes=dm.num_classes, cond_dim=dm.cond_dim,
                                backbone={"kind": "unet", "channels": [4, 8], "emb_dim": 16})
    path = save_teacher(teacher, tmp_path / "teacher.pt")
    (run,) = distill(compose(base + [f"teacher.path={path}"]))
    assert run["step"] == 2 and run["warm_start"]  # student.backbone=null: the teacher's architecture, copied
    student = load_energy(run["student_path"])
    assert student.event_shape == tuple(dm.event_shape) and student.f.cond_emb.kind == dm.cond_kind
    levels = run["levels"]  # the level diagnostics of image students: against the teacher's time score
    n = len(cfg.distill.sigma_buckets) - 1
    assert len(levels["time_score"]["rms"]) == n and all(math.isfinite(v) for v in levels["time_score"]["rms"])
    assert levels["time_score"]["divergence"] == "hutchinson" and "mode_offsets" not in levels
    assert all(math.isfinite(v) for v in levels["residual"]["residual"] + levels["residual"]["asymmetry_rel"])
    assert list((tmp_path / "run" / "student" / "plots").glob("*.png"))
    assert (tmp_path / "run" / "student" / "csv" / "metrics.csv").is_file()


def test_energy_gap_metric_sees_mode_offsets_the_denoiser_error_misses():
    """A model whose energy is exact up to a constant c on one of two separated modes has the exact denoiser at
    small sigma (the offset has zero gradient where the data are) but wrong mode masses under SMC; the relative-energy
    metric reports rms = c sqrt(P(pair straddles the modes)) = c / sqrt(2) for two equal modes."""
    from fkdiff.distillation import denoiser_error_by_bucket, energy_gap_error_by_bucket
    from teachers import GaussianMixture

    gmm = GaussianMixture([[-1.0, 0.0], [1.0, 0.0]], 0.05**2 * torch.eye(2).expand(2, 2, 2))

    class Offset:
        def energy(self, x, sigma):
            return gmm.energy(x, sigma) + 1.0 * (x[:, 0] > 0).to(x.dtype)

        def __call__(self, x, sigma, cond=None):
            return gmm(x, sigma)

    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(4000, generator=g)
    edges = [0.002, 0.01, 0.05]
    den = denoiser_error_by_bucket(Offset(), gmm, x0, edges, g)
    assert max(den["ratio"]) < 1e-12  # blind to the offset
    gap = energy_gap_error_by_bucket(Offset(), gmm, x0, edges, g)
    # P(straddle) has standard error sqrt(0.25 / 2000) ~ 0.011 -> rms within ~0.01 of 0.707 (4 SE: 0.03)
    assert all(abs(r - 0.5**0.5) < 0.03 for r in gap["rms_nats"]), gap
    assert max(energy_gap_error_by_bucket(gmm, gmm, x0, edges, g)["rms_nats"]) < 1e-9
