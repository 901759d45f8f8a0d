"""Issue 7 items 7, 10, 11, 12: a second run into a run folder, the process-group timeout, silent wrong results and
unclear errors at the library's boundaries. Every file here is written by the test (real formats, real damage)."""

from __future__ import annotations

import json
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from fkdiff import compose, smc
from fkdiff.energy import build_student, load_energy, save_student
from fkdiff.files import ChecksumError, CorruptFileError
from fkdiff.smc.potentials import Box, Polytope
from teachers.presets import ring8, strip

SMC = dict(shape=(2,), num_levels=8, sigma_max=80.0, sigma_min=0.002)


@pytest.fixture()
def gen():
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------------------------------------------ 11: silent wrong results


def test_one_level_is_an_error_not_the_denoiser_at_sigma_max(gen):
    """num_levels=1 used to return D(x, sigma_max) (samples near the mean of ring8, |x| < 0.01, not on the ring)."""
    with pytest.raises(ValueError, match=r"num_levels=1: one level cannot go from sigma_max=80.0 down to sigma_min"):
        smc.sample(ring8(), 20, generator=gen, **{**SMC, "num_levels": 1})


def test_num_particles_and_num_levels_must_be_whole(gen):
    """num_particles=2.5 used to become 2 silently."""
    with pytest.raises(ValueError, match=r"num_particles must be a whole number, got 2.5"):
        smc.sample(ring8(), 2.5, generator=gen, **SMC)
    with pytest.raises(ValueError, match=r"num_levels must be a whole number, got 7.5"):
        smc.sample(ring8(), 20, generator=gen, **{**SMC, "num_levels": 7.5})
    assert smc.sample(ring8(), 20.0, generator=gen, **SMC).samples.shape == (20, 2)  # a whole float is fine


def test_cli_num_particles_must_be_whole(tmp_path):
    from fkdiff.recipes import compose as compose_cfg
    from fkdiff.sample import run

    cfg = compose_cfg(["recipe=toy2d", f"run_dir={tmp_path}", "sample.num_particles=2.5", "sample.num_levels=4",
                       "sample.plot.enabled=false", "sample.progress=false"])
    with pytest.raises(ValueError, match=r"num_particles must be a whole number, got 2.5"):
        run(cfg)


def test_huge_mixture_weights_normalise():
    """[1e308, 1e308] used to normalise to [0, 0] (their sum overflows)."""
    m = compose.mixture(ring8(), strip(), weights=[1e308, 1e308])
    assert m.weights.tolist() == [0.5, 0.5]
    assert compose.mixture(ring8(), strip(), weights=[1e308, 3e307]).weights.tolist() == pytest.approx([10 / 13, 3 / 13])


def test_negation_outside_its_range():
    """alpha >= 1 gave samples at |x| ~ 1e6 and log Z ~ 3e15 with only degeneracy warnings; alpha < 0 is no negation."""
    with pytest.warns(compose.ImproperTargetWarning, match=r"alpha=1.5 >= 1: p_base / p_other\^alpha is an improper"):
        compose.negation(ring8(), strip(), alpha=1.5)
    with pytest.raises(ValueError, match=r"alpha >= 0 .* got -0.5; .*product\(base, tempered\(other, \|alpha\|\)\)"):
        compose.negation(ring8(), strip(), alpha=-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compose.negation(ring8(), strip(), alpha=0.5)  # Du et al.'s value: no warning


def _student(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    s = build_student((2,), 0.5, backbone={"kind": "mlp", "width": 16, "num_blocks": 1})
    return save_student(s, tmp_path / "student.pt", step=3)


def test_bit_flipped_student_is_refused(tmp_path):
    """A flipped bit in the weights used to load silently."""
    path = _student(tmp_path)
    data = torch.load(path, weights_only=True)
    name = next(k for k, v in data["state_dict"].items() if v.is_floating_point() and v.numel() > 4)
    t = data["state_dict"][name]
    t.view(torch.int32).view(-1)[3] ^= 1 << 20  # one bit of one weight
    torch.save(data, path)
    with pytest.raises(ChecksumError, match=rf"{path}: the weights do not match the checksum stored with them"):
        load_energy(path)
    del data["checksum"]  # a file written before checksums existed still loads
    torch.save(data, path)
    load_energy(path)


# ------------------------------------------------------------------------------------------------ 12: clear errors


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "missing_keys"])
def test_damaged_student_file_names_the_file(tmp_path, damage):
    """Used to be `OSError: [Errno 22]` / `EOFError:` / `KeyError: 101` / `KeyError: 'config'`, with no path."""
    path = _student(tmp_path)
    raw = path.read_bytes()
    expected = {"truncated": r"is truncated or damaged \(\d+ bytes", "empty": r"is empty \(0 bytes\)",
                "text": r"is not a torch file \(it starts with b'epoc'", "missing_keys": r"without config"}[damage]
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("epoch,loss\n1,0.3\n")
    else:
        data = torch.load(path, weights_only=True)
        del data["config"]
        torch.save(data, path)
    with pytest.raises(CorruptFileError, match=rf"{path}.*{expected}|{expected}"):
        load_energy(path)
    with pytest.raises(CorruptFileError) as info:
        load_energy(path)
    assert str(path) in str(info.value)


def test_teacher_file_missing_keys_and_truncated(tmp_path):
    """teacher.pt without its spec used to be `KeyError: 'spec'`."""
    from teachers.edm import EDMDenoiser
    from teachers.load import load_teacher_checkpoint, save_teacher

    den = EDMDenoiser.build((2,), backbone={"kind": "mlp", "width": 16, "num_blocks": 1})
    path = save_teacher(den, tmp_path / "teacher.pt")
    load_teacher_checkpoint(path)
    data = torch.load(path, weights_only=True)
    del data["spec"]
    torch.save(data, path)
    with pytest.raises(CorruptFileError, match=rf"{path} is a .* file without spec"):
        load_teacher_checkpoint(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=rf"{path} is truncated or damaged"):
        load_teacher_checkpoint(path)


def test_bad_sampling_arguments_are_clear_errors(gen):
    """shape=() (IndexError), rho=0 (ZeroDivisionError), dtype=int64 (NotImplementedError 'normal_kernel_cpu'), a 3-D
    Box on a 2-D target (a size mismatch at the first level), conditional(ring, strip) ('Box' object is not iterable)."""
    with pytest.raises(ValueError, match=r"shape is the event shape of one particle"):
        smc.sample(ring8(), 20, generator=gen, **{**SMC, "shape": ()})
    with pytest.raises(ValueError, match=r"rho \(the schedule's exponent\) must be positive and finite, got 0"):
        smc.sample(ring8(), 20, generator=gen, rho=0, **SMC)
    with pytest.raises(ValueError, match=r"dtype and eval_dtype must be floating-point"):
        smc.sample(ring8(), 20, generator=gen, dtype=torch.int64, **SMC)
    with pytest.raises(ValueError, match=r"Box bounds of shape \(3,\) do not fit particles of event shape \(2,\)"):
        smc.sample(ring8(), 20, generator=gen, potentials=[Box([-1, -1, -1], [1, 1, 1])], **SMC)
    with pytest.raises(ValueError, match=r"Polytope has 3 columns but particles of event shape \(2,\) have 2"):
        smc.sample(ring8(), 20, generator=gen, potentials=[Polytope([[1.0, 0.0, 0.0]], [1.0])], **SMC)
    with pytest.raises(TypeError, match=r"conds must be a list of the conditional models .* got a Box"):
        compose.conditional(ring8(), strip())
    smc.sample(ring8(), 20, generator=gen, potentials=[Box(-1.0, 1.0)], **SMC)  # a scalar bound broadcasts


def test_interrupted_sample_leaves_no_diagnostics(tmp_path, monkeypatch):
    """An interrupted `fkdiff.sample` used to leave samples.pt and diagnostics.json, nothing marking it incomplete;
    diagnostics.json is now written last (and removed when a run starts), so its absence marks an incomplete folder."""
    from fkdiff import plotting
    from fkdiff.recipes import compose as compose_cfg
    from fkdiff.sample import DONE, run

    cfg = compose_cfg(["recipe=toy2d", f"run_dir={tmp_path}", "sample.num_particles=16", "sample.num_levels=4",
                       "sample.progress=false", "sample.compare_reverse_diffusion=false"])
    (tmp_path / DONE).write_text("{}")  # an earlier, complete run in the folder

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plotting, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert (tmp_path / "samples.pt").is_file() and not (tmp_path / DONE).exists()
    monkeypatch.undo()
    diag = run(cfg)
    assert json.loads((tmp_path / DONE).read_text())["log_Z"] == pytest.approx(diag["log_Z"])


# ------------------------------------------------------------------------------ 10: the process group's timeout


def test_timeout_option_reaches_the_process_group():
    """The process-group timeout was Lightning's default (30 min), not configurable."""
    from lightning.pytorch.strategies import DDPStrategy

    from fkdiff.recipes import compose as compose_cfg
    from fkdiff.training.trainer import strategy_with_timeout

    assert compose_cfg(["recipe=toy2d"]).timeout == 1800
    s = strategy_with_timeout("ddp_spawn", 7)
    assert isinstance(s, DDPStrategy) and s._timeout == timedelta(seconds=7) and s._start_method == "spawn"
    assert strategy_with_timeout("auto", 7) == "auto" and strategy_with_timeout("ddp", None) == "ddp"
