"""The README stays true: its Python example runs, CI runs its test command verbatim, and every command of its
```bash blocks runs verbatim through bash (see `test_readme_command_runs_verbatim` for how)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_example_runs_and_is_right(capsys):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    res = scope["res"]
    # exact log Z of ring x strip at sigma_min = 0.002 (grid integral, see tests/test_sample_cli.py): -0.5169
    assert abs(res.log_Z - (-0.5169)) < 4 * res.log_Z_se + 0.05
    assert scope["x"].shape == (2000, 2)


def test_ci_runs_the_readme_test_command_verbatim():
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2 and commands[0].endswith("-m fkdiff.distill") and commands[1].endswith("-m pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# every command of the README's ```bash blocks, verbatim, through bash


def _bash_commands() -> list[str]:
    """The commands of the README's ```bash blocks, as bash reads them (backslash-newline removed), comments and
    blank lines skipped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", "").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                out.append(line.strip())
    return out


COMMANDS = _bash_commands()
SHIM = {
    # the venv's python, composing the config only: `--cfg job` makes Hydra print the job config and exit, after
    # parsing every override and composing every group and recipe (what a training or sampling run would start from)
    "python": '#!/bin/sh\nexec "{python}" "$@" --cfg job\n',
    # torchrun: its own argument parser validates the launcher flags, then one process (this one) composes the config
    "torchrun": ('#!{python}\nimport runpy, sys\nfrom torch.distributed.run import get_args_parser\n'
                 'args = get_args_parser().parse_args(sys.argv[1:])\nassert args.module, "torchrun without -m"\n'
                 'sys.argv = [args.training_script, *args.training_script_args, "--cfg", "job"]\n'
                 'runpy.run_module(args.training_script, run_name="__main__", alter_sys=True)\n'),
    # SLURM: srun drops its own options and runs the command; scontrol names this host
    "srun": '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done\nexec "$@"\n',
    "scontrol": '#!/bin/sh\necho localhost\n',
}


def test_readme_has_the_commands_we_test():
    assert len(COMMANDS) >= 12
    assert sum("pip install" in c for c in COMMANDS) == 2
    assert any(c.startswith("torchrun") for c in COMMANDS) and any(c.startswith("srun") for c in COMMANDS)


def _run_verbatim(command: str, tmp_path: Path) -> str | None:
    """Run one README command (see `test_readme_commands_run_verbatim`); None if it passed, else what went wrong."""
    if "pip install" in command:
        res = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        return None if res.returncode == 0 else f"{command}\n{res.stderr}"
    shims = tmp_path / "shims"
    shims.mkdir(parents=True)
    for name, text in SHIM.items():
        (shims / name).write_text(text.replace("{python}", sys.executable))
        (shims / name).chmod(0o755)
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(shims / "python")
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "HEAD": "localhost", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 or "task:" not in res.stdout:  # "task:": the composed config was printed
        return f"{command}\nexit {res.returncode}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
    if (tmp_path / "runs").exists():
        return f"{command}\nwrote runs/: it ran instead of composing"
    return None


def test_readme_commands_run_verbatim(tmp_path):
    """Every command through `bash -c`, verbatim (quoting included). The two set-up commands (venv + pip) are checked
    with `bash -n` (syntax only: they download and install); every other command runs with launchers that compose the
    config with Hydra's `--cfg job` instead of training or sampling (the runs themselves are tested elsewhere, on
    small settings): `python` is the venv's python with `--cfg job` appended, `torchrun` validates its flags with
    torch's own parser and starts one such process, `srun` drops its options. Each command runs in an empty folder
    holding `.venv/bin/python`, so `.venv/bin/python ...` works too. Two commands at a time (each is a process)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = list(pool.map(lambda ic: _run_verbatim(ic[1], tmp_path / f"c{ic[0]}"), enumerate(COMMANDS)))
    failed = [e for e in errors if e]
    assert not failed, "\n\n".join(failed)
