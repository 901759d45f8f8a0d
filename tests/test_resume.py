"""Nothing is lost on a kill (issue 7 items 4, 5, 7, 8, 9): the default two-student recipe, killed with SIGKILL in either
student or stopped with SIGTERM, then resumed with the README's command, ends with the students and report of an
uninterrupted run, bit for bit; a finished student's files never change again; a resume uses the run's own config;
SIGTERM checkpoints and exits 143; a resumed W&B run continues the killed one.

The runs are the toy2d recipe shrunk (tiny MLPs, 100 steps, checkpoints every 10 by the default max_steps / 10), killed
as real subprocesses when a checkpoint of the student in question shows a step >= 30.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fkdiff.distill import distill
from fkdiff.recipes import compose
from fkdiff.training import RunDirBusy, RunDirNotEmpty, checkpoint_step

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
MAX_STEPS = 100
TINY2 = ["recipe=toy2d", "logger=none", "trainer.enable_progress_bar=false", "distill.plot.enabled=false",
         "distill.diagnostics_every_n_steps=0", "distill.val_every_n_steps=100000", "student.backbone.width=16",
         "student.backbone.num_blocks=1", "data.batch_size=64", "data.num_samples=1024", "distill.num_threads=1",
         "+trainer.enable_model_summary=false", "distill.eval.num_samples=256", "distill.plot.grid=40"]
README_RESUME = ["distill.max_steps=3000", "distill.ckpt_path=last"]  # README: `run_dir=runs/toy2d distill.max_steps=...`


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    distill(compose(TINY2 + [f"run_dir={run}", f"distill.max_steps={MAX_STEPS}"]))
    return run


def _start(run: Path, *extra: str, max_steps: int = MAX_STEPS) -> subprocess.Popen:
    log = open(run.parent / f"{run.name}.stderr", "w")
    return subprocess.Popen([sys.executable, "-m", "fkdiff.distill", *TINY2, f"run_dir={run}",
                             f"distill.max_steps={max_steps}", *extra], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=log)


def _stderr(run: Path) -> str:
    p = run.parent / f"{run.name}.stderr"
    return p.read_text() if p.is_file() else ""


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, student: str, min_step: int, timeout: float = 240) -> int:
    path = run / student / "checkpoints" / "last.ckpt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {path} reached step {min_step}:\n"
                        + _stderr(run)[-3000:])
        step = checkpoint_step(path) if path.is_file() else None
        if step is not None and step >= min_step:
            return step
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{path} did not reach step {min_step} in {timeout} s")


def _kill9(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no clean-up of any kind
    proc.wait(timeout=60)


def _readme_resume(run: Path) -> subprocess.CompletedProcess:
    """The README's resume command, as written there but for the run folder (and max_steps: the run's own)."""
    return subprocess.run([sys.executable, "-m", "fkdiff.distill", f"run_dir={run}", f"distill.max_steps={MAX_STEPS}",
                           "distill.ckpt_path=last"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _assert_same_run(run: Path, ref: Path) -> None:
    for name in ("ring8", "strip"):
        assert (run / name / "student.pt").read_bytes() == (ref / name / "student.pt").read_bytes(), name
    mine = json.loads((run / "report.json").read_text().replace(str(run), "<run>"))
    theirs = json.loads((ref / "report.json").read_text().replace(str(ref), "<run>"))
    assert mine == theirs and set(mine["students"]) == {"ring8", "strip"}
    assert all("errors" in s and "energy_errors" in s for s in mine["students"].values())


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- kill -9, each student


def test_kill_in_the_first_student_then_the_readme_resume_finishes_both(tmp_path, reference):
    """Killed during ring8: the README's resume (run_dir + ckpt_path=last only; the tiny sizes come from the run's
    saved config) resumes ring8 exactly and starts strip, which never started (it used to die with FileNotFoundError
    for strip's missing last.ckpt, and before that resume with the recipe's default network sizes)."""
    run = tmp_path / "run"
    proc = _start(run)
    step = _wait_for_checkpoint(proc, run, "ring8", 30)
    # item 7: a second run into the folder, fresh or resuming, is refused while the first one runs (they used to mix)
    for extra in ([], ["distill.ckpt_path=last"]):
        with pytest.raises(RunDirBusy, match=rf"run folder {run} is in use by process {proc.pid} on host"):
            distill(compose(TINY2 + [f"run_dir={run}", f"distill.max_steps={MAX_STEPS}", *extra]))
    _kill9(proc)  # the kernel frees the lock of a killed process: the resume below takes the folder over
    assert step < MAX_STEPS and not (run / "ring8" / "result.json").exists() and not (run / "strip").exists()
    res = _readme_resume(run)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_run(run, reference)


def test_kill_in_the_second_student_leaves_the_first_alone(tmp_path, reference):
    """Killed during strip: the resume leaves ring8's files exactly as they were (bytes and modification times) and
    resumes strip; a second resume of the finished run changes nothing at all (it used to overwrite each EMA
    student.pt with raw weights and rewrite report.json)."""
    run = tmp_path / "run"
    proc = _start(run)
    _wait_for_checkpoint(proc, run, "strip", 30)
    _kill9(proc)
    assert (run / "ring8" / "result.json").is_file() and not (run / "strip" / "result.json").exists()
    ring = _snapshot(run / "ring8")
    distill(compose([f"run_dir={run}", "distill.ckpt_path=last"]))  # in-process: compose applies the saved config
    assert _snapshot(run / "ring8") == ring
    _assert_same_run(run, reference)
    before = {k: v for k, v in _snapshot(run).items() if not k.startswith(".hydra") and not k.endswith(".log")}
    distill(compose([f"run_dir={run}", "distill.ckpt_path=last"]))
    after = {k: v for k, v in _snapshot(run).items() if not k.startswith(".hydra") and not k.endswith(".log")}
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert set(changed) <= {"config.yaml", "report.json", "densities.png"}, changed  # re-written, same contents:
    assert all(before[k][0] == after[k][0] for k in changed), changed
    assert before.keys() == after.keys()


def test_a_student_trained_to_the_end_but_not_finalised_gets_its_ema_weights(tmp_path, reference):
    """A kill between the final checkpoint and result.json: the resume writes student.pt from the checkpoint's EMA
    weights (the resume used to run Lightning at max_steps, skipping the EMA swap, and save the raw weights)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "ring8" / "student.pt").unlink()
    (run / "ring8" / "result.json").unlink()
    (run / "report.json").unlink()
    distill(compose([f"run_dir={run}", "distill.ckpt_path=last"]))
    _assert_same_run(run, reference)


# ------------------------------------------------------------------------------------------ SIGTERM and W&B


def _wandb_records(path: Path) -> list:
    """The records of a W&B `.wandb` file (LevelDB log format: 32 KiB blocks of [crc32, length, type] + data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pos, buf = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            out.append(rec)
        buf = chunk if kind == 2 else buf + chunk if kind == 3 else b""
    return out


def _wandb_run(folder: Path) -> dict:
    (file,) = folder.glob("run-*.wandb")
    recs = _wandb_records(file)
    steps = [float(i.value_json) for r in recs if r.WhichOneof("record_type") == "history"
             for i in r.history.item if (i.key or "/".join(i.nested_key)) == "trainer/global_step"]
    exits = [r.exit.exit_code for r in recs if r.WhichOneof("record_type") == "exit"]
    (run_id,) = {r.run.run_id for r in recs if r.WhichOneof("record_type") == "run"}
    return {"id": run_id, "steps": steps, "exit": exits}


@pytest.mark.slow  # ~80 s on 2 busy cores: a W&B subprocess run, SIGTERM, and the resume
def test_sigterm_checkpoints_exits_143_and_the_wandb_run_continues(tmp_path, reference):
    """SIGTERM in ring8 (scheduler preemption): the run finishes its step, writes last.ckpt, closes its W&B run with
    exit code 143 and exits with status 143 (it used to exit 0 with no student written, so a requeue wrapper counted
    it done). The resume ends with the uninterrupted run's students and report and logs into the same W&B run,
    its history going on from the checkpoint (it used to open a new W&B run)."""
    run = tmp_path / "run"
    proc = _start(run, "logger=wandb", "logger.mode=offline", "trainer.log_every_n_steps=5")
    seen = _wait_for_checkpoint(proc, run, "ring8", 30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, _stderr(run)[-3000:]
    err = _stderr(run)
    step = checkpoint_step(run / "ring8" / "checkpoints" / "last.ckpt")
    assert seen <= step < MAX_STEPS and f"SIGTERM at step {step}: checkpoint written" in err, err[-3000:]
    assert "distill.ckpt_path=last" in err and not (run / "strip").exists()
    (killed,) = (run / "ring8" / "wandb").glob("offline-run-*")
    first = _wandb_run(killed)
    assert first["exit"] == [143] and max(first["steps"]) <= step

    distill(compose([f"run_dir={run}", "distill.ckpt_path=last"]))
    _assert_same_run(run, reference)
    wandb_id = json.loads((run / "ring8" / "logger.json").read_text())["wandb_id"]
    (resumed,) = [d for d in (run / "ring8" / "wandb").glob("offline-run-*") if d != killed]
    second = _wandb_run(resumed)
    assert first["id"] == second["id"] == wandb_id
    assert second["exit"] == [0] and min(second["steps"]) > max(first["steps"]) - 5 and max(second["steps"]) >= 94


# ------------------------------------------------------------------------------------ the run's own config


def _saved_run(tmp_path: Path, *extra: str) -> Path:
    from fkdiff.training import save_config

    run = tmp_path / "run"
    save_config(compose(TINY2 + [f"run_dir={run}", "distill.max_steps=37", "seed=3", *extra]), run,
                ckpt_key="distill.ckpt_path")
    return run


def test_resume_uses_the_saved_config_with_the_command_line_on_top(tmp_path):
    """The README's resume `run_dir=<run> distill.ckpt_path=last` used the recipe's defaults (1500 steps, seed 0, the
    default network) instead of the run's own config."""
    from omegaconf import OmegaConf

    from fkdiff.training import task_trainer_config

    run = _saved_run(tmp_path)
    saved = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    resumed = compose([f"run_dir={run}", "distill.ckpt_path=last"])
    mine = OmegaConf.to_container(resumed, resolve=True)
    assert mine["distill"].pop("ckpt_path") == "last" and saved["distill"].pop("ckpt_path") is None
    assert mine == saved
    assert task_trainer_config(resumed, "distill")["max_steps"] == 37  # never past the run's own max_steps
    assert resumed.distill.checkpoint_every_n_steps is None  # null in the saved config: fixed when training starts
    more = compose([f"run_dir={run}", "distill.ckpt_path=last", "distill.max_steps=50", "recipe=toy2d", "logger=csv"])
    assert task_trainer_config(more, "distill")["max_steps"] == 50 and more.seed == 3 and more.logger.kind == "csv"
    assert more.student.backbone.width == 16  # recipe=toy2d names the run's recipe: its own values stay
    from fkdiff.training import ConfigError

    with pytest.raises(ConfigError, match=r"recipe=\.\.\. selects another recipe than the run's \(data.name"):
        compose([f"run_dir={run}", "distill.ckpt_path=last", "recipe=digits"])
    with pytest.raises(ConfigError, match=r"data=\.\.\. selects another data"):
        compose([f"run_dir={run}", "distill.ckpt_path=last", "data=moons"])


def test_a_run_saved_before_a_key_existed_resumes_with_todays_value(tmp_path, capsys):
    """A teacher run saved before `train_teacher.val_every_n_steps` existed stopped its resume with KeyError."""
    from omegaconf import OmegaConf

    run = _saved_run(tmp_path)
    old = OmegaConf.load(run / "config.yaml")
    del old.distill["val_every_n_steps"], old.train_teacher["val_every_n_steps"]
    OmegaConf.save(old, run / "config.yaml")
    today = compose([])  # what the resume command composes today (the default recipe)
    resumed = compose([f"run_dir={run}", "distill.ckpt_path=last"])
    assert resumed.distill.val_every_n_steps == today.distill.val_every_n_steps
    assert resumed.train_teacher.val_every_n_steps == today.train_teacher.val_every_n_steps
    assert resumed.distill.max_steps == 37 and resumed.seed == 3  # the run's own values stay
    assert OmegaConf.to_container(resumed.logger) == OmegaConf.to_container(old.logger)  # its logger: no keys added
    out = capsys.readouterr().out
    assert "predates these keys" in out and f"distill.val_every_n_steps={today.distill.val_every_n_steps}" in out


def test_checkpoint_interval_is_fixed_when_the_run_starts_and_the_newest_checkpoint_is_found(tmp_path):
    """Extending a run (a larger max_steps on resume) used to change the checkpoint interval (max_steps / 10); the
    changed ModelCheckpoint state made Lightning write last-v1.ckpt beside a stale last.ckpt, which the next resume
    picked. The interval is now saved with the config, last.ckpt is always overwritten, and `last` means the newest
    checkpoint whatever its name."""
    from fkdiff.training import newest_checkpoint

    run = tmp_path / "run"
    args = TINY2 + ["teacher.preset=[ring8]", "distill.eval.enabled=false"]
    distill(compose(args + [f"run_dir={run}", "distill.max_steps=20"]))
    assert compose([f"run_dir={run}", "distill.ckpt_path=last"]).distill.checkpoint_every_n_steps == 2
    distill(compose([f"run_dir={run}", "distill.ckpt_path=last", "distill.max_steps=40"]))
    ckpts = sorted(re.sub(r"epoch=\d+-", "", p.name) for p in (run / "ring8" / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step=40.ckpt"], ckpts  # every 2 steps, top-1 kept; no last-v1.ckpt
    assert checkpoint_step(run / "ring8" / "checkpoints" / "last.ckpt") == 40
    # a folder left by an older run with a stale last.ckpt beside a newer last-v1.ckpt: the newest wins
    stale = tmp_path / "stale" / "checkpoints"
    stale.mkdir(parents=True)
    torch.save({"global_step": 30}, stale / "last.ckpt")
    torch.save({"global_step": 40}, stale / "last-v1.ckpt")
    (stale / "last-v2.ckpt").write_bytes((stale / "last.ckpt").read_bytes()[:50])  # torn: skipped
    assert newest_checkpoint(stale.parent) == (stale / "last-v1.ckpt", 40)


def test_a_resume_never_trains_past_the_run(tmp_path):
    from fkdiff.training import ConfigError

    run = tmp_path / "run"
    args = TINY2 + ["teacher.preset=[ring8]", "distill.eval.enabled=false"]
    distill(compose(args + [f"run_dir={run}", "distill.max_steps=6"]))
    before = _snapshot(run)
    with pytest.raises(RunDirNotEmpty, match=rf"run_dir {run} already holds a run .*distill.ckpt_path=last"):
        distill(compose(args + [f"run_dir={run}", "distill.max_steps=6", "seed=1"]))  # item 7: a second fresh run
    assert _snapshot(run) == before
    with pytest.raises(ConfigError, match=r"trained to step 6, past distill.max_steps=4"):
        distill(compose([f"run_dir={run}", "distill.ckpt_path=last", "distill.max_steps=4"]))


# ------------------------------------------------------------------------------- a frozen rank (the timeout option)


@pytest.mark.slow
def test_a_frozen_rank_fails_the_run_after_the_timeout(tmp_path):
    """Item 10: a rank that stops (SIGSTOP of Lightning's DDP child process) used to stall the other rank silently
    for the default 30 minutes; with `timeout=60` the run fails after ~60 s with an error naming the option, and the
    frozen child does not outlive it."""
    run = tmp_path / "run"
    proc = _start(run, "teacher.preset=[ring8]", "distill.eval.enabled=false", "trainer.devices=2",
                  "trainer.strategy=ddp", "timeout=60", "distill.checkpoint_every_n_steps=5", max_steps=100000)
    _wait_for_checkpoint(proc, run, "ring8", 5, timeout=400)
    children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    (child,) = [c for c in children if "fkdiff.distill" in Path(f"/proc/{c}/cmdline").read_text()]
    os.kill(child, signal.SIGSTOP)
    t0 = time.time()
    try:
        code = proc.wait(timeout=240)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    err = _stderr(run)
    assert code != 0 and 55 < time.time() - t0 < 200, err[-3000:]
    assert "waited longer than the process-group timeout (timeout=60 s)" in err and "raise the `timeout` option" in err


# --------------------------------------------------------------------------------------------- teachers.train


def test_teacher_resume_leaves_a_finished_teacher_alone_and_finalises_with_ema(tmp_path):
    """Item 4 for `teachers.train`: re-running a finished run with ckpt_path=last used to resume Lightning at
    max_steps (no training, no EMA swap) and overwrite teacher.pt with the raw weights; a teacher killed after its
    final checkpoint but before teacher.pt gets the checkpoint's EMA weights, as the uninterrupted run wrote them."""
    from teachers.train import train

    run = tmp_path / "run"
    base = ["recipe=toy2d", "task=train_teacher", "data.num_samples=160", "data.batch_size=32",
            "train_teacher.backbone.width=16", "train_teacher.backbone.num_blocks=1", "train_teacher.ema_decay=0.9",
            "logger=none", "+trainer.limit_val_batches=0", "+trainer.enable_model_summary=false",
            "train_teacher.max_steps=6"]
    out = train(compose(base + [f"run_dir={run}"]))
    first = (out.read_bytes(), out.stat().st_mtime_ns)
    train(compose([f"run_dir={run}", "task=train_teacher", "train_teacher.ckpt_path=last"]))
    assert (out.read_bytes(), out.stat().st_mtime_ns) == first
    out.unlink()  # killed between the final checkpoint and teacher.pt
    train(compose([f"run_dir={run}", "task=train_teacher", "train_teacher.ckpt_path=last"]))
    a, b = torch.load(out, weights_only=True), torch.load(io.BytesIO(first[0]), weights_only=True)
    assert a["step"] == b["step"] == 6 and a["checksum"] == b["checksum"]
