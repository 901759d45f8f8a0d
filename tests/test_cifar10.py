"""`recipe=cifar10` end to end on CPU: the public teacher (a tiny UNet2DModel of google/ddpm-cifar10-32's class, in
its on-disk format, placed in an offline Hugging Face cache) distilled for a few steps into an energy over a copy of
its network, then a small class-conditional SMC batch drawn from the result with `fkdiff.sample`; the sigma range
and the conditioning come from the teacher; our own EDM teacher still works through teacher=checkpoint."""

import pytest
import torch

from conftest import write_cifar
from fkdiff.distill import distill
from fkdiff.energy import load_energy
from fkdiff.recipes import compose
from teachers.hub import DDPM_CIFAR10

pytest.importorskip("diffusers")
from public_models import offline_hf, place_in_hub_cache, save_ddpm_folder  # noqa: E402,F401  (offline_hf: fixture)


def _base(tmp_path, *extra):
    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", n_per_batch=8)
    return ["recipe=cifar10", f"data.root={tmp_path / 'cifar'}", f"run_dir={tmp_path / 'run'}", "logger.kind=csv",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "data.batch_size=4", "distill.max_steps=3",
            "distill.val_every_n_steps=3", "distill.warmup_steps=1", "distill.plot.num_steps=2",
            "distill.plot.num_samples=2", "distill.plot.val_examples=4", "distill.diagnostics_every_n_steps=1",
            "distill.num_threads=1", *extra]


def test_recipe_distils_the_cached_public_teacher_and_samples_a_class(tmp_path, offline_hf):
    from fkdiff.sample import run as sample_run

    place_in_hub_cache(offline_hf, DDPM_CIFAR10, save_ddpm_folder(tmp_path / "src", num_classes=10))
    cfg = compose(_base(tmp_path))
    assert cfg.teacher.hub_id == DDPM_CIFAR10 and cfg.student.backbone == "teacher"
    (run,) = distill(cfg)
    assert run["step"] == 3 and run["warm_start"]
    student = load_energy(run["student_path"])  # rebuilt from its file alone (no teacher, no network)
    assert student.config["network"]["kind"] == "diffusers" and student.g_kind == "ip"
    assert student.sigma_min == pytest.approx(0.0100, rel=1e-3) and student.sigma_max == pytest.approx(157.4, rel=1e-3)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(student.energy(x, 0.5, torch.tensor([1, 1])), student.energy(x, 0.5, torch.tensor([4, 4])))
    metrics = (tmp_path / "run" / "student" / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics
    # a small class-conditional SMC batch from the distilled student
    scfg = compose(["recipe=cifar10", "task=sample", f"run_dir={tmp_path / 'sample'}",
                    f"sample.models.cifar.path={run['student_path']}", "sample.models.cifar.cond=3",
                    "sample.num_particles=4", "sample.num_levels=3", "sample.progress=false"])
    diag = sample_run(scfg)
    out = torch.load(tmp_path / "sample" / "samples.pt", weights_only=True)
    assert out["samples"].shape == (4, 3, 32, 32) and torch.isfinite(out["samples"]).all()
    assert diag["num_particles"] == 4 and diag["log_Z"] == diag["log_Z"]  # not NaN
    assert (tmp_path / "sample" / "samples.png").is_file()


def test_unconditional_teacher_gives_an_unconditional_student_in_its_sigma_range(tmp_path):
    """The public DDPM model is unconditional: the class-conditional CIFAR-10 data's labels are dropped (distilling
    used to fail with diffusers' `class_embedding needs to be initialized`), and the sigma law is truncated to the
    schedule's [0.01, 157.4] (a law centred at 0.007 would otherwise stop at the teacher's range check)."""
    folder = save_ddpm_folder(tmp_path / "uncond")
    base = _base(tmp_path, "teacher.hub_id=null", f"teacher.path={folder}", "distill.p_mean=-5.0",
                 "distill.plot.enabled=false")
    with pytest.raises(ValueError, match=r"lies outside this schedule's range \[0.01, 157.4\]"):
        distill(compose(base + ["distill.sigma_range=full", f"run_dir={tmp_path / 'run_full'}"]))
    (run,) = distill(compose(base))
    student = load_energy(run["student_path"])
    x = torch.randn(2, 3, 32, 32)
    student.energy(x, 0.5)
    with pytest.raises(ValueError, match="unconditional"):
        student.energy(x, 0.5, torch.tensor([1, 2]))


def test_recipe_with_our_own_edm_teacher(tmp_path):
    """teacher=checkpoint (python -m teachers.train recipe=cifar10): a class-conditional EDM teacher, its student
    over a copy of its network; without teacher.path the error says what to run."""
    from fkdiff.training import build_datamodule_from_config
    from teachers import EDMDenoiser, save_teacher

    base = _base(tmp_path, "teacher=checkpoint")
    with pytest.raises(FileNotFoundError, match="python -m teachers.train recipe=cifar10"):
        distill(compose(base))
    dm = build_datamodule_from_config(compose(base).data)
    teacher = EDMDenoiser.build(dm.event_shape, sigma_data=dm.sigma_data, cond_kind="class", num_classes=10,
                                backbone={"kind": "unet", "channels": [4, 8], "emb_dim": 16})
    path = save_teacher(teacher, tmp_path / "teacher.pt")
    (run,) = distill(compose(base + [f"teacher.path={path}"]))
    student = load_energy(run["student_path"])
    assert run["step"] == 3 and student.config["network"]["kind"] == "edm"
    assert (student.sigma_min, student.sigma_max) == (teacher.sigma_min, teacher.sigma_max)


@pytest.mark.slow
def test_recipe_under_ddp_two_cpu_processes_matches_one(tmp_path):
    """The cifar10 recipe unchanged under `trainer.devices=2 trainer.strategy=ddp` (gloo, 2 CPU processes, the real
    entry point) with a local teacher of the public model's class: the student over the teacher's copy trains to the
    weights of the 1-process run (the global batch and its noise do not depend on the process count)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_distill import _assert_same_weights, _weights

    root = Path(__file__).resolve().parents[1]
    folder = save_ddpm_folder(tmp_path / "teacher", num_classes=10)
    common = [a for a in _base(tmp_path, "teacher.hub_id=null", f"teacher.path={folder}", "distill.plot.enabled=false",
                               "distill.checkpoint_every_n_steps=3", "distill.lr=1e-3",
                               "distill.ema_decay=null") if not a.startswith("run_dir=")]
    res = subprocess.run([sys.executable, "-m", "fkdiff.distill", *common, f"run_dir={tmp_path / 'ddp'}",
                          "trainer.devices=2", "trainer.strategy=ddp"], cwd=root, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MEMBER: 2/2" in res.stdout + res.stderr
    (single,) = distill(compose(common + [f"run_dir={tmp_path / 'one'}"]))
    (ddp_student,) = (tmp_path / "ddp").rglob("student.pt")
    # attention key biases have no gradient (softmax ignores a logit shift shared by all keys): Adam turns their
    # rounding noise into full steps of size lr, so they are left out
    a, b = ({k: v for k, v in _weights(p).items() if not k.endswith("to_k.bias")}
            for p in (ddp_student, single["student_path"]))
    _assert_same_weights(a, b, rtol=1e-4, atol=1e-6)
    (other,) = distill(compose(common + [f"run_dir={tmp_path / 'seed1'}", "seed=1"]))  # the tolerance discriminates
    c = {k: v for k, v in _weights(other["student_path"]).items() if not k.endswith("to_k.bias")}
    with pytest.raises(AssertionError):
        _assert_same_weights(c, b, rtol=1e-4, atol=1e-6)


def test_fsdp_strategy_is_lightnings_with_the_run_timeout():
    """`trainer.strategy=fsdp` on the cifar10 recipe: the distill trainer config becomes Lightning's FSDPStrategy with
    the run's process-group timeout, and on a CPU accelerator Lightning itself refuses it (FSDP needs a GPU)."""
    from datetime import timedelta

    from lightning.pytorch.strategies import FSDPStrategy

    from fkdiff.training import build_trainer
    from fkdiff.training.trainer import strategy_with_timeout, task_trainer_config

    cfg = compose(["recipe=cifar10", "trainer.strategy=fsdp", "timeout=77"])
    tr = task_trainer_config(cfg, "distill")
    strategy = strategy_with_timeout(tr["strategy"], cfg.timeout)
    assert isinstance(strategy, FSDPStrategy) and strategy._timeout == timedelta(seconds=77)
    with pytest.raises(Exception, match="`fsdp` requires a GPU accelerator"):
        build_trainer(tr, "unused", timeout=cfg.timeout)


@pytest.mark.slow
def test_fsdp_strategy_reaches_lightning_unchanged(tmp_path):
    """`trainer.strategy=fsdp` with the recipe unchanged goes to Lightning's FSDPStrategy (with the run's process-group
    timeout); on this CPU machine Lightning refuses FSDP (it needs a GPU accelerator) at once, before any training
    step. The real FSDP run is test_recipe_under_fsdp_on_a_gpu (marked gpu)."""
    import time

    folder = save_ddpm_folder(tmp_path / "teacher", num_classes=10)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="`fsdp` requires a GPU accelerator"):
        distill(compose(_base(tmp_path, "teacher.hub_id=null", f"teacher.path={folder}", "distill.plot.enabled=false",
                              "trainer.strategy=fsdp")))
    assert time.perf_counter() - t0 < 60
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not list((tmp_path / "run").rglob("student.pt"))


@pytest.mark.gpu
def test_recipe_under_fsdp_on_a_gpu(tmp_path):
    """The cifar10 recipe unchanged under `trainer.strategy=fsdp` on one GPU (FSDP over a world of 1: the sharding,
    gathering and the full state dict written to student.pt are real): the student trains to the weights of the plain
    single-GPU run (same seed, same batches) and differs from a seed-1 run. Not yet run (no GPU in this session)."""
    from test_distill import _assert_same_weights, _weights

    folder = save_ddpm_folder(tmp_path / "teacher", num_classes=10)
    common = [a for a in _base(tmp_path, "teacher.hub_id=null", f"teacher.path={folder}", "distill.plot.enabled=false",
                               "distill.lr=1e-3", "trainer.accelerator=gpu", "trainer.devices=1")
              if not a.startswith("run_dir=")]
    (fsdp,) = distill(compose(common + [f"run_dir={tmp_path / 'fsdp'}", "trainer.strategy=fsdp"]))
    (plain,) = distill(compose(common + [f"run_dir={tmp_path / 'plain'}"]))
    (other,) = distill(compose(common + [f"run_dir={tmp_path / 'seed1'}", "seed=1"]))
    a, b, c = ({k: v for k, v in _weights(r["student_path"]).items() if not k.endswith("to_k.bias")}
               for r in (fsdp, plain, other))
    _assert_same_weights(a, b, rtol=1e-3, atol=1e-5)
    with pytest.raises(AssertionError):
        _assert_same_weights(c, b, rtol=1e-3, atol=1e-5)
    assert load_energy(fsdp["student_path"]).config["network"]["kind"] == "diffusers"
