"""The CPU-sized image recipes (`digits_small`, `shapes_small`) run end to end, tiny: teacher training by the recipe
(its own backbone and data, 2 steps), distillation of that teacher (2 steps), then the two phase-1 benchmark scripts
on the result (`benchmarks/image_recipes.py`, `benchmarks/image_smc_sizing.py --quick`), checking what they write.
The numbers the full-size runs give are in the report of issue 10; here only the wiring and the outputs' contents."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fkdiff import load_energy
from fkdiff.recipes import available_recipes, compose
from teachers import load_teacher

REPO = Path(__file__).resolve().parent.parent
QUIET = ["logger.kind=none", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
SMALL = {"digits_small": ((1, 8, 8), "class", []),
         "shapes_small": ((3, 16, 16), "position", ["data.num_samples=64"])}


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """recipe -> (teacher.pt, student.pt) after 2 teacher steps and 2 distillation steps with the recipe's nets."""
    from fkdiff.distill import distill
    from teachers.train import train

    out = {}
    for recipe, (_, _, extra) in SMALL.items():
        root = tmp_path_factory.mktemp(recipe)
        cfg = compose([f"recipe={recipe}", "task=train_teacher", f"run_dir={root / 'teacher'}", "data.batch_size=8",
                       "train_teacher.max_steps=2", "trainer.limit_val_batches=0", *QUIET, *extra])
        teacher = train(cfg)
        (run,) = distill(compose([f"recipe={recipe}", f"run_dir={root / 'distill'}", f"teacher.path={teacher}",
                                  "data.batch_size=8", "distill.max_steps=2", "distill.val_every_n_steps=2",
                                  "distill.plot.num_steps=2", "distill.plot.num_samples=4",
                                  "distill.plot.val_examples=8", "distill.diagnostics_every_n_steps=1",
                                  "logger.kind=none", "trainer.enable_progress_bar=false", *extra]))
        out[recipe] = (teacher, Path(run["student_path"]))
    from fkdiff.metrics import save_classifier, train_digits_classifier

    out["classifier"] = save_classifier(train_digits_classifier(8, steps=20), tmp_path_factory.mktemp("clf") / "c.pt")
    return out


@pytest.mark.parametrize("recipe", sorted(SMALL))
def test_small_recipe_trains_and_distils(recipe, trained):
    """The recipe lists only differences, selects its data size and nets, and yields a loadable teacher and an
    energy student of the same architecture (warm-started) on that event shape and condition."""
    assert recipe in available_recipes()
    shape, cond_kind, _ = SMALL[recipe]
    cfg = compose([f"recipe={recipe}"])
    assert cfg.train_teacher.max_steps <= 3000 and cfg.distill.max_steps <= 1000  # CPU-sized
    teacher_path, student_path = trained[recipe]
    teacher, student = load_teacher(teacher_path), load_energy(student_path)
    assert teacher.event_shape == shape and teacher.cond_kind == cond_kind
    assert student.event_shape == shape and student.f.cond_emb.kind == cond_kind
    assert tuple(teacher.spec["backbone"]["channels"]) == tuple(cfg.train_teacher.backbone.channels)
    assert set(student.f.state_dict()) == set(teacher.backbone.state_dict())
    pmap = recipe == "shapes_small"  # the position-conditioned net also sees the position as an input channel
    assert student.f.position_map == teacher.backbone.position_map == pmap
    assert student.f.inp.weight.shape[1] == teacher.backbone.inp.weight.shape[1] == shape[0] + pmap


def test_position_map_follows_the_shapes_position_convention():
    from fkdiff.data.shapes import pixel_to_position
    from fkdiff.nets import UNet, coordinate_channels, position_map

    grid = coordinate_channels(3, 16, 16)
    rc = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1)  # [H, W, (row, col)]
    assert grid.shape == (3, 2, 16, 16) and torch.equal(grid[1], pixel_to_position(rc, 16).permute(2, 0, 1))
    centres = torch.tensor([[3, 12], [0, 0]])
    cond = torch.cat([pixel_to_position(centres, 16), torch.full((1, 2), float("nan"))])
    m = position_map(cond, 3, 16, 16)[:, 0]
    for b, (r, c) in enumerate(centres.tolist()):
        assert m[b, r, c] == 1.0 and int(m[b].argmax()) == r * 16 + c
        if r + 1 < 16 and c + 1 < 16:  # one pixel away: exp(-1/2); diagonal: exp(-1)
            assert m[b, r + 1, c].item() == pytest.approx(math.exp(-0.5))
            assert m[b, r + 1, c + 1].item() == pytest.approx(math.exp(-1.0))
    assert m[2].abs().max() == 0 and position_map(None, 2, 16, 16).abs().max() == 0  # null condition
    with pytest.raises(ValueError, match="position_map needs"):
        UNet(1, (8, 8), cond_kind="class", num_classes=10, position_map=True)
    net = UNet(3, (8, 8), cond_kind="position", cond_dim=2, position_map=True, zero_init=False)
    x = torch.randn(3, 3, 16, 16)
    out = net(x, torch.zeros(3), cond)
    moved = net(x, torch.zeros(3), cond.flip(0))  # another position changes the output where the bumps are
    assert out.shape == x.shape and not torch.allclose(out, moved)


def test_image_recipes_benchmark_writes_metrics(trained, tmp_path):
    bench = _bench("image_recipes")
    for recipe in ("digits_small", "shapes_small"):
        teacher, student = trained[recipe]
        out = tmp_path / recipe
        res = bench.main(["--teacher", str(teacher), "--student", str(student), "--out", str(out),
                          "--num-samples", "20", "--steps", "3", "--num-eval", "16",
                          "--classifier", str(trained["classifier"])])
        saved = json.loads((out / "eval.json").read_text())
        assert saved["kind"] == res["kind"] == recipe.split("_")[0]
        assert len(saved["denoiser_error"]["ratio"]) == 6 and all(math.isfinite(r) for r in saved["denoiser_error"]["ratio"])
        key = "class_accuracy" if recipe == "digits_small" else "position_accuracy"
        for who in ("teacher", "student", "real_val"):
            assert 0.0 <= saved["samples"][who][key] <= 1.0
        if recipe == "shapes_small":
            assert saved["samples"]["real_val"][key] == 1.0  # the exact detector on real scenes
        assert (out / "samples_teacher.png").is_file() and (out / "samples_student.png").is_file()
        assert (out / "eval.md").read_text().count("|") > 20


def test_image_smc_sizing_quick(trained, tmp_path):
    """--quick: every target, N=16, 6 levels, with and without HMC, two seeds; rows, aggregates, grids, table."""
    bench = _bench("image_smc_sizing")
    _, student = trained["digits_small"]
    out = tmp_path / "sizing"
    res = bench.main(["--student", str(student), "--quick", "--out", str(out),
                      "--classifier", str(trained["classifier"])])
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert len(rows) == len(bench.TARGETS) * 2 * 2 == len(res["runs"])
    for r in rows:
        assert r["num_particles"] == 16 and r["levels"] == 6 and math.isfinite(r["log_Z"])
        assert 0 < r["min_ess_frac"] <= 1 and 1 <= r["min_unique_ancestors"] <= 16
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 0
        assert (r["mean_acceptance"] is None) == (r["mcmc"] == "none")
        assert sum(r["class_counts"]) == 16
    agg = res["aggregate"]
    assert len(agg) == len(bench.TARGETS) * 2 and all(a["num_seeds"] == 2 and a["log_Z_sd"] is not None for a in agg)
    assert {Path(g).name for g in res["grids"]} == {f"grid_{t}.png" for t in bench.TARGETS}
    assert (out / "results.md").read_text().count("\n| ") == len(agg) + 1
    # --append: done runs are skipped, a new seed of one cell is added, the aggregate follows
    again = bench.main(["--student", str(student), "--out", str(out), "--classifier", str(trained["classifier"]),
                        "--append", "--targets", "product", "--num-particles", "16", "--levels", "6", "--mcmc", "none",
                        "--seeds", "0", "2"])
    assert len(again["runs"]) == len(rows) + 1 and again["runs"][:len(rows)] == rows
    cell = [a for a in again["aggregate"] if a["target"] == "product" and a["mcmc"] == "none"]
    assert len(cell) == 1 and cell[0]["num_seeds"] == 3 and again["meta"]["seeds"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="beta"):
        bench.main(["--student", str(student), "--out", str(out), "--classifier", str(trained["classifier"]),
                    "--append", "--quick", "--beta", "3"])


def test_peak_rss_sees_an_allocation():
    bench = _bench("image_smc_sizing")
    with bench.PeakRSS() as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
        import time

        time.sleep(0.1)
        del x
    assert mem.peak - mem.start > 48
