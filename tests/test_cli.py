"""The training command line as researchers use it (issue 8 item 6, issue 7 item 6): one knob per setting with errors
that name the key, Lightning's messages printed once, a progress bar in optimizer steps with an ETA that continues
after a resume, a useful `--help`, no empty folders left by failed runs, no process-wide side effects (environment,
sys.argv)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fkdiff.recipes import compose, remove_if_no_results
from fkdiff.training import ConfigError, task_trainer_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TINY = ["recipe=toy2d", "teacher.preset=[ring8]", "logger=none", "distill.plot.enabled=false",
        "distill.eval.enabled=false", "distill.diagnostics_every_n_steps=0", "distill.val_every_n_steps=100000",
        "student.backbone.width=16", "student.backbone.num_blocks=1", "data.batch_size=64", "data.num_samples=1024",
        "distill.num_threads=1", "+trainer.enable_model_summary=false"]


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------ one knob


def test_max_steps_has_one_knob():
    cfg = compose(TINY + ["distill.max_steps=7"])
    assert task_trainer_config(cfg, "distill")["max_steps"] == 7  # trainer.max_steps follows distill.max_steps
    assert task_trainer_config(compose(TINY + ["distill.max_steps=7", "trainer.max_steps=7"]), "distill")[
        "max_steps"] == 7  # agreeing copies are fine
    with pytest.raises(ConfigError, match=r"trainer.max_steps=100 disagrees with distill.max_steps=7.*"
                                          r"Set distill.max_steps=<value>"):
        task_trainer_config(compose(TINY + ["distill.max_steps=7", "trainer.max_steps=100"]), "distill")
    with pytest.raises(ConfigError, match=r"trainer.max_steps=abc disagrees with distill.max_steps"):
        task_trainer_config(compose(TINY + ["trainer.max_steps=abc"]), "distill")
    with pytest.raises(ConfigError, match=r"distill.max_steps must be a positive integer, got 'abc'"):
        task_trainer_config(compose(TINY + ["distill.max_steps=abc"]), "distill")
    with pytest.raises(ConfigError, match=r"train_teacher.max_steps must be a positive integer, got 0"):
        task_trainer_config(compose(TINY + ["task=train_teacher", "train_teacher.max_steps=0"]), "train_teacher")
    with pytest.raises(ConfigError, match=r"trainer.gradient_clip_val=0.5 disagrees with distill.gradient_clip_val"):
        task_trainer_config(compose(TINY + ["trainer.gradient_clip_val=0.5"]), "distill")
    teacher = compose(TINY + ["task=train_teacher", "train_teacher.max_steps=11"])
    assert task_trainer_config(teacher, "train_teacher")["max_steps"] == 11
    assert task_trainer_config(teacher, "train_teacher")["gradient_clip_val"] is None


def test_bad_max_steps_fails_before_running_and_leaves_no_folder(tmp_path):
    """`trainer.max_steps=abc` used to exit 0 after a full run; now it exits non-zero naming the key, and the failed
    run leaves no folder behind."""
    run_dir = tmp_path / "run"
    res = _run("fkdiff.distill", *TINY, f"run_dir={run_dir}", "trainer.max_steps=abc")
    assert res.returncode != 0
    assert "trainer.max_steps=abc disagrees with distill.max_steps" in res.stderr
    assert not run_dir.exists()


def test_a_failed_run_removes_its_folder_only_without_results(tmp_path):
    """What `fkdiff.recipes.run_task` does when a task raises (the subprocess test above shows it on a real run)."""
    kept = tmp_path / "kept"
    (kept / ".hydra").mkdir(parents=True)
    (kept / "distill.log").write_text("")
    (kept / "config.yaml").write_text("")
    (kept / "ring8" / "checkpoints").mkdir(parents=True)
    assert not remove_if_no_results(kept) and kept.is_dir()  # a student's folder: results, kept
    (kept / "ring8" / "checkpoints").rmdir(), (kept / "ring8").rmdir()
    assert remove_if_no_results(kept) and not kept.exists()  # only Hydra's files, the log and the config: removed
    assert not remove_if_no_results(tmp_path / "never-made")


# --------------------------------------------------------------------------------------- output of a run


def test_lightning_messages_print_once_and_the_bar_counts_steps(tmp_path):
    res = _run("fkdiff.distill", *TINY, f"run_dir={tmp_path / 'run'}", "distill.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert out.count("`Trainer.fit` stopped: `max_steps=3` reached.") == 1, out[-3000:]
    assert out.count("GPU available:") == 1
    assert "3/3 [" in out and "Epoch" not in out  # the bar counts optimizer steps, not batches of an epoch
    log = (tmp_path / "run" / "distill.log").read_text()
    assert "`Trainer.fit` stopped" in log  # Hydra's log file still gets Lightning's messages


def test_progress_bar_continues_at_the_restored_step_with_an_eta(tmp_path, capsys):
    from teachers.train import train

    base = ["recipe=toy2d", "task=train_teacher", f"run_dir={tmp_path}", "data.num_samples=160", "data.batch_size=32",
            "train_teacher.backbone.width=16", "train_teacher.backbone.num_blocks=1", "train_teacher.ema_decay=0.9",
            "logger=none", "+trainer.limit_val_batches=0", "+trainer.enable_model_summary=false",
            "+trainer.checkpoint_every_n_steps=4"]
    train(compose(base + ["train_teacher.max_steps=4"]))
    capsys.readouterr()
    train(compose(base + ["train_teacher.max_steps=8", "train_teacher.ckpt_path=last"]))
    out = capsys.readouterr().out
    frames = re.findall(r"step:\s+\d+%\|[^|]*\|\s+(\d+)/(\d+) \[(\d\d:\d\d)<(\d\d:\d\d|\?)", out)
    assert frames, out[-2000:]
    assert {int(t) for _, t, _, _ in frames} == {8}
    steps = [int(n) for n, _, _, _ in frames]
    assert steps[0] == 4 and steps[-1] == 8  # starts at the restored step, ends at max_steps
    assert any(eta != "?" for *_, eta in frames[1:])  # a remaining-time estimate once steps were made


def test_help_lists_groups_recipes_and_key_options():
    res = _run("fkdiff.distill", "--help", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "This is the distill entry point" in out
    for line in ("recipe: cifar10, digits, digits_small, digits_small_compose, shapes, shapes_small, toy2d",
                 "teacher: analytic, checkpoint, diffusers, edm_pickle, ve, vp",
                 "logger: csv, none, tensorboard, wandb", "data: cifar10, digits, moons, shapes, toy2d"):
        assert line in out, out
    for key in ("distill.max_steps", "teacher.path", "distill.ckpt_path=last", "--cfg job"):
        assert key in out
    assert "sigma_buckets" not in out  # no comment-less config dump


# ------------------------------------------------------------------------------------ no global side effects


def test_entry_points_set_the_task_without_touching_sys_argv(monkeypatch, capsys):
    import fkdiff.distill
    import teachers.train

    for module, task in ((fkdiff.distill, "distill"), (teachers.train, "train_teacher")):
        argv = ["prog", "recipe=digits", "--cfg", "job"]
        monkeypatch.setattr(sys, "argv", list(argv))
        module.main()
        assert sys.argv == argv
        out = capsys.readouterr().out
        assert f"task: {task}" in out and "name: digits" in out


def test_wandb_logger_leaves_the_environment_alone(tmp_path):
    from fkdiff.training import build_logger, finish_logger

    keys = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_SILENT", "WANDB_MODE")  # what runs leaked
    before = {k: os.environ.get(k) for k in keys}
    logger = build_logger({"kind": "wandb", "mode": "offline"}, tmp_path / "a", name="t")
    logger.log_metrics({"x": 1.0}, step=0)
    finish_logger(logger)
    assert {k: os.environ.get(k) for k in keys} == before
    assert list((tmp_path / "a" / "wandb").glob("offline-run-*/run-*.wandb"))
