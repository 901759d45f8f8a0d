"""The README stays true: its Python example runs, and CI runs its test command verbatim."""

import re
from pathlib import Path

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
