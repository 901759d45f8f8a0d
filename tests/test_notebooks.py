"""The notebooks run top to bottom offline (nbclient, the venv's own kernel)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# the tour distils a student and samples images: minutes on 2 shared cores (3 min at its committed size, measured);
# the test runs it with fewer distillation steps and particles
SLOW = {"tour": {"TOUR_STEPS": "60", "TOUR_PARTICLES": "256"}}


def _params():
    for p in NOTEBOOKS:
        marks = [pytest.mark.slow] if p.stem in SLOW else []
        yield pytest.param(p, SLOW.get(p.stem, {}), id=p.stem, marks=marks)


@pytest.mark.parametrize("path, env", list(_params()))
def test_notebook_runs(path, env, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "SMC error" in text
    if path.stem == "tour":  # every section ran to its comparison with the exact answer
        for what in ("log Z of p^2", "violations 0 of", "fraction of 7s: exact 1.000"):
            assert what in text, what
