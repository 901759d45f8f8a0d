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
# Launch shims. bash runs each command verbatim (quoting, `$VAR`, `$(...)`, `&&`, `.venv/bin/python`) with these first
# on PATH; the programs that would train or sample only record the argv they were given (NUL-separated), and the test
# then runs that argv through the program's own entry point with Hydra's `--cfg job` (see
# `test_readme_commands_run_verbatim`). Recording instead of starting a Python per command keeps this test to one
# torch import.
SHIM = {
    "python": '#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$FKDIFF_RECORD.python.$$"\n',
    "torchrun": '#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$FKDIFF_RECORD.torchrun.$$"\n',
    # SLURM: srun drops its own options and runs the command; scontrol names this host
    "srun": '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done\nexec "$@"\n',
    "scontrol": '#!/bin/sh\necho localhost\n',
}


def test_readme_has_the_commands_we_test():
    assert len(COMMANDS) >= 12
    assert sum("pip install" in c for c in COMMANDS) == 2
    assert any(c.startswith("torchrun") for c in COMMANDS) and any(c.startswith("srun") for c in COMMANDS)


def _record(command: str, folder: Path) -> list[tuple[str, list[str]]] | str:
    """Run one README command through bash with the recording shims, in an empty `folder` holding
    `.venv/bin/python`; returns (launcher, argv) of each program it started, or what went wrong."""
    shims = folder / "shims"
    shims.mkdir(parents=True)
    for name, text in SHIM.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    venv_bin = folder / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(shims / "python")
    records = folder / "records"
    records.mkdir()
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "FKDIFF_RECORD": str(records / "argv"),
           "HEAD": "localhost", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "1"}
    res = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return f"bash exit {res.returncode}\n{res.stderr[-2000:]}"
    started = [(f.name.split(".")[1], f.read_bytes().decode().split("\0")[:-1]) for f in sorted(records.iterdir())]
    return started or "started no program"


def _compose(launcher: str, argv: list[str], cwd: Path) -> str | None:
    """Run the recorded program's entry point in this process with `--cfg job` appended: Hydra parses every override
    and composes every group and recipe (what a training or sampling run would start from), prints the job config
    and returns. `torchrun`'s own argument parser validates the launcher flags first."""
    import contextlib
    import io
    import runpy
    import warnings

    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        usage = io.StringIO()
        try:
            with contextlib.redirect_stderr(usage):
                args = get_args_parser().parse_args(argv)
        except SystemExit:
            return f"torchrun {argv}\n{usage.getvalue()[-500:]}"
        if not args.module:
            return "torchrun without -m"
        module, rest = args.training_script, list(args.training_script_args)
    else:
        if len(argv) < 2 or argv[0] != "-m":
            return f"python {argv}: not `python -m <entry point>`"
        module, rest = argv[1], argv[2:]
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    try:
        os.chdir(cwd)
        sys.argv = [module, *rest, "--cfg", "job"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the entry module is also imported as a module
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            return f"exit {e.code}\n{out.getvalue()[-1500:]}\n{err.getvalue()[-3000:]}"
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    if "task:" not in out.getvalue():  # "task:": the composed config was printed
        return f"no config printed\n{out.getvalue()[-1500:]}\n{err.getvalue()[-3000:]}"
    if (cwd / "runs").exists():
        return "wrote runs/: it ran instead of composing"
    return None


def test_readme_commands_run_verbatim(tmp_path):
    """Every command through `bash -c`, verbatim (quoting included). The two set-up commands (venv + pip) are checked
    with `bash -n` (syntax only: they download and install). Every other command runs with launch shims first on
    PATH that record the argv bash hands them (`python` and `.venv/bin/python`; `torchrun`, whose flags torch's own
    parser then validates; `srun` drops its options and runs the rest); the recorded program's entry point then runs
    with that argv and Hydra's `--cfg job`, which composes the config and exits instead of training or sampling (the
    runs themselves are tested elsewhere, on small settings)."""
    failed = []
    for i, command in enumerate(COMMANDS):
        if "pip install" in command:
            res = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            if res.returncode != 0:
                failed.append(f"{command}\n{res.stderr}")
            continue
        started = _record(command, tmp_path / f"c{i}")
        errors = [started] if isinstance(started, str) else [_compose(*s, tmp_path / f"c{i}") for s in started]
        failed += [f"{command}\n{e}" for e in errors if e]
    assert not failed, "\n\n".join(failed)
