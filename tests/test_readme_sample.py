"""README's sampling commands run as written in bash (`bash -c`, quoting included), from a fresh working directory.

Every line of a ```bash block of README.md that runs `fkdiff.sample` is checked twice:
- in the default suite, bash itself splits the line into words (`printf` in place of the program: quote removal,
  comments) and those words must compose the real config, with the values the line meant (fast);
- run exactly as written, with the venv's `bin` first on PATH (as an activated venv) and `.venv` linked to the venv
  running the tests: in the default suite for the composition with parentheses (the quoting that once failed),
  `slow` for the others (full-size runs of a minute or more each on 2 CPU cores), `gpu` on CUDA where that many
  GPUs exist. `sample.students=latest` finds students written in the real format under `runs/distill/`
  (untrained: the command's wiring is under test, not the students).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fkdiff.recipes import compose

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINES = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S) for ln in block.splitlines()
         if "fkdiff.sample" in ln]
MIXTURE = [ln for ln in LINES if "mixture(" in ln]


def _words(line: str) -> list[str]:
    """The arguments bash passes to `fkdiff.sample` for `line` (bash's own word splitting and quote removal)."""
    rest = line.split("fkdiff.sample", 1)[1]
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + rest], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.split("\0") if w]


def _run_verbatim(line: str, cwd: Path, timeout: float) -> dict:
    """Run `line` with bash -c in `cwd`; returns the diagnostics.json of the run folder it wrote."""
    from fkdiff.energy import build_student, save_student

    venv = Path(sys.prefix)
    (cwd / ".venv").symlink_to(venv, target_is_directory=True)
    for preset in ("ring8", "strip"):  # what `python -m fkdiff.distill` leaves behind, for sample.students=latest
        torch.manual_seed(0)
        st = build_student((2,), 0.5, "l2", backbone={"kind": "mlp", "width": 16, "num_blocks": 1})
        save_student(st, cwd / "runs" / "distill" / "2026-01-01_00-00-00" / preset / "student.pt")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-3000:])
    runs = sorted((cwd / "runs" / "sample").glob("*/diagnostics.json"))
    assert len(runs) == 1 and "[fkdiff.sample]" in proc.stdout, (runs, proc.stdout[-2000:])
    return json.loads(runs[0].read_text())


def test_readme_has_the_sampling_commands():
    assert len(LINES) >= 6 and len(MIXTURE) == 1
    # why README quotes the expression: unquoted, Hydra reads mixture(...) as a call of an unknown function
    with pytest.raises(Exception, match="mixture"):
        compose(["sample.target=mixture(ring, strip, weights=[1, 3])"])


@pytest.mark.parametrize("line", LINES)
def test_readme_sampling_command_composes_as_bash_splits_it(line):
    words = _words(line)
    cfg = compose([w for w in words if not w.startswith("--")])
    for w in words:  # every override the line gives is in the composed config, with the value bash passed on
        key, _, value = w.lstrip("+").partition("=")
        if key == "sample.target":
            assert cfg.sample.target == value.strip('"') in ("mixture(ring, strip, weights=[1, 3])", "tempered(ring, 4)")
        elif key.startswith("sample/"):
            assert cfg.sample[key.split("/")[1]].kind == value
        elif key.startswith("sample.potentials."):
            assert cfg.sample.potentials[key.rsplit(".", 1)[1]].kind == "polytope"
        elif key.startswith("sample.") and value.replace(".", "").isdigit():
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert float(node) == float(value), (key, node, value)


@pytest.mark.parametrize("line", MIXTURE)
def test_readme_composition_command_runs_verbatim(line, tmp_path):
    diag = _run_verbatim(line, tmp_path, timeout=600)
    assert diag["target"] == "mixture(ring, strip, weights=[1, 3])" and diag["num_particles"] == 500
    assert abs(diag["log_Z"]) < 4 * diag["log_Z_se"] + 0.05  # normalised components, normalised weights: log Z = 0


@pytest.mark.slow
@pytest.mark.parametrize("line", [ln for ln in LINES if "cuda" not in ln and ln not in MIXTURE])
def test_readme_sampling_command_runs_verbatim(line, tmp_path):
    diag = _run_verbatim(line, tmp_path, timeout=1800)
    assert diag["log_Z"] is not None


@pytest.mark.gpu
@pytest.mark.parametrize("line", [ln for ln in LINES if "cuda" in ln])
def test_readme_cuda_sampling_command_runs_verbatim(line, tmp_path):
    need = int(re.search(r"--nproc_per_node=(\d+)", line).group(1)) if "nproc_per_node" in line else 1
    if torch.cuda.device_count() < need:
        pytest.skip(f"needs {need} GPUs")
    _run_verbatim(line, tmp_path, timeout=1800)
