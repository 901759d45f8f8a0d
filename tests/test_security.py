"""Trust model (README "Trust model"): no file runs code unless the user opted in.

Each test plants a hostile file that would create a marker file if anything unpickled it, then checks the marker is
absent and the error is clear: EDM network pickles only with the boolean opt-in `allow_pickle=True`; CIFAR-10 batches
through an allow-list unpickler; Lightning checkpoints resumed weights-only.
"""

import io
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_cifar
from fkdiff.data.sources import UnsafePickleError, load_cifar10, safe_unpickle
from teachers import load_teacher
from teachers.adapters import load_edm_pickle
from teachers.load import strict_bool

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this object creates `marker` (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(path: Path, marker: Path, wrap=lambda p: {"ema": p}) -> Path:
    with open(path, "wb") as f:
        pickle.dump(wrap(_Payload(marker)), f, protocol=2)
    return path


# ------------------------------------------------------------------------------------------ EDM pickle opt-in


@pytest.mark.parametrize("value", ["no", "off", "false", "False", "0", "yes", "", 0, 1, "true ish", None, False])
def test_allow_pickle_only_a_real_true_unpickles(tmp_path, value):
    marker = tmp_path / "pwned"
    evil = _evil_pickle(tmp_path / "network-snapshot.pkl", marker)
    with pytest.raises((PermissionError, ValueError, TypeError)) as err:
        load_teacher({"kind": "edm_pickle", "path": str(evil), "allow_pickle": value})
    assert not marker.exists(), f"allow_pickle={value!r} unpickled the file"
    assert "allow_pickle" in str(err.value)


@pytest.mark.parametrize("value", ["false", 0, 1, "true"])
def test_load_edm_pickle_itself_needs_the_boolean(tmp_path, value):
    marker = tmp_path / "pwned"
    evil = _evil_pickle(tmp_path / "network-snapshot.pkl", marker)
    with pytest.raises((PermissionError, TypeError)):
        load_edm_pickle(evil, allow_pickle=value)
    assert not marker.exists()


def test_strict_bool():
    assert strict_bool(True, "k") is True and strict_bool("TRUE", "k") is True
    assert strict_bool(False, "k") is False and strict_bool(None, "k") is False and strict_bool("false", "k") is False
    for bad in ("no", "off", "yes", "1", 1, 0, 1.0, []):
        with pytest.raises(ValueError, match="k must be true or false"):
            strict_bool(bad, "k")


def test_cli_allow_pickle_no_does_not_unpickle(tmp_path):
    """The issue's reproduction: `teacher.allow_pickle=no` used to enable unpickling through bool("no")."""
    marker = tmp_path / "pwned"
    evil = _evil_pickle(tmp_path / "evil.pkl", marker)
    proc = subprocess.run(
        [sys.executable, "-m", "fkdiff.distill", "recipe=digits", "teacher.kind=edm_pickle", f"teacher.path={evil}",
         "teacher.allow_pickle=no", f"run_dir={tmp_path / 'run'}", "logger.kind=none"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert not marker.exists()
    assert "teacher.allow_pickle must be true or false" in proc.stderr


# ------------------------------------------------------------------------------------------ CIFAR-10 batches


def test_planted_cifar_batch_is_refused_without_running(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    marker = tmp_path / "pwned"
    _evil_pickle(folder / "data_batch_1", marker, wrap=lambda p: {b"data": p, b"labels": [0]})
    with pytest.raises(UnsafePickleError, match=r"data_batch_1: refusing to load io\.open"):
        load_cifar10(tmp_path)
    assert not marker.exists()
    write_cifar(folder)  # clean batches again; now only the meta file is hostile: it is read with the same guard
    _evil_pickle(folder / "batches.meta", marker, wrap=lambda p: p)
    with pytest.raises(UnsafePickleError, match="batches.meta"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_planted_batch_is_refused_by_the_datamodule(tmp_path):
    from fkdiff.data import build_datamodule

    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    _evil_pickle(tmp_path / "data_batch_3", marker, wrap=lambda p: {b"data": p, b"labels": [0]})
    with pytest.raises(UnsafePickleError, match="data_batch_3"):
        build_datamodule("cifar10", root=str(tmp_path), batch_size=4).setup("fit")
    assert not marker.exists()


def test_python2_era_batches_still_load(tmp_path):
    """The official files were written by Python 2 numpy: their globals are `numpy.core.multiarray ...`."""
    d = {b"batch_label": b"b", b"labels": [3, 1], b"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8)
         .reshape(2, 3072), b"filenames": [b"a.png", b"b.png"]}
    raw = pickle.dumps(d, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    out = io.StringIO()
    pickletools.dis(raw, out=out)  # still a well-formed pickle
    (tmp_path / "b").write_bytes(raw)
    back = safe_unpickle(tmp_path / "b")
    np.testing.assert_array_equal(back[b"data"], d[b"data"])
    assert back[b"labels"] == [3, 1]
    for proto in (4, 5):  # what numpy 2 writes today
        (tmp_path / f"p{proto}").write_bytes(pickle.dumps(d, protocol=proto))
        np.testing.assert_array_equal(safe_unpickle(tmp_path / f"p{proto}")[b"data"], d[b"data"])


def test_truncated_or_empty_batch_names_the_file(tmp_path):
    write_cifar(tmp_path)
    raw = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"data_batch_2 is truncated or not a valid data pickle"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data_batch_2 is truncated"):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------------------ checkpoints


def _planted_resume_configs(tmp_path, evil):
    common = ["recipe=toy2d", "logger.kind=none", "trainer.enable_progress_bar=false", "data.batch_size=16",
              f"run_dir={tmp_path / 'run'}", "+trainer.enable_model_summary=false"]
    return {
        "distill": common + ["teacher.preset=[ring8]", "distill.plot.enabled=false", "distill.eval.enabled=false",
                             "student.backbone.width=8", "student.backbone.num_blocks=1", "distill.max_steps=2",
                             f"distill.ckpt_path={evil}"],
        "train_teacher": common + ["task=train_teacher", "data.num_samples=64", "train_teacher.max_steps=2",
                                   "train_teacher.backbone.width=8", "train_teacher.backbone.num_blocks=1",
                                   "+trainer.limit_val_batches=0", f"train_teacher.ckpt_path={evil}"],
    }


@pytest.mark.parametrize("task", ["distill", "train_teacher"])
def test_resume_from_a_planted_checkpoint_does_not_unpickle(tmp_path, monkeypatch, task):
    """Resuming from `ckpt_path=<file>` loads weights-only on every torch version: the load asks for
    weights_only=True explicitly (torch < 2.6 defaulted to full unpickling), checked by recording torch.load's
    arguments, and the planted payload never runs."""
    from fkdiff.distill import distill
    from fkdiff.recipes import compose
    from teachers.train import train

    calls = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((str(getattr(f, "name", f)), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    marker = tmp_path / "pwned"
    evil = _evil_pickle(tmp_path / "last.ckpt", marker, wrap=lambda p: {"state_dict": {}, "x": p})
    cfg = compose(_planted_resume_configs(tmp_path, evil)[task])
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        (distill if task == "distill" else train)(cfg)
    assert not marker.exists()
    resumed = [w for f, w in calls if f.endswith("last.ckpt")]
    assert resumed and all(w is True for w in resumed), calls


def test_vp_target_must_build_a_module():
    """Configs are code (README): `teacher.target` imports and calls a callable; what it returns must be a network."""
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        load_teacher({"kind": "vp", "target": "builtins:dict", "schedule": {"kind": "linear"}})
    with pytest.raises(TypeError, match="int, not a torch.nn.Module"):
        load_teacher({"kind": "vp", "target": "builtins:int", "schedule": {"kind": "linear"}})
