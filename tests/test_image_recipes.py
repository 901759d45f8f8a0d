"""The CPU-sized image recipes (`digits_small`, `shapes_small`) run end to end, tiny: teacher training by the recipe
(its own backbone and data, 2 steps), distillation of that teacher (2 steps), then the two phase-1 benchmark scripts
on the result (`benchmarks/image_recipes.py`, `benchmarks/image_smc_sizing.py --quick`), checking what they write.
The numbers the full-size runs give are in the report of issue 10; here only the wiring and the outputs' contents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
import torch

from benchmark_modules import load_benchmark
from fkdiff import load_energy
from fkdiff.recipes import available_recipes, compose
from teachers import load_teacher

QUIET = ["logger.kind=none", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
SMALL = {"digits_small": ((1, 8, 8), "class", []),
         "shapes_small": ((3, 16, 16), "position", ["data.num_samples=64"])}


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
                                  "distill.eval.level_samples=16", "distill.eval.integrated=false",
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
    bench = load_benchmark("image_recipes")
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


@pytest.mark.slow  # 1-2 min on 2 shared cores; the default suite runs benchmarks/image_claims.py --quick instead
def test_image_smc_sizing_quick(trained, tmp_path):
    """--quick: every target, N=16, 6 levels, with and without HMC, two seeds; rows, aggregates, grids, table."""
    bench = load_benchmark("image_smc_sizing")
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
    import mmap

    bench = load_benchmark("image_smc_sizing")
    with bench.PeakRSS() as mem:
        # fresh pages (an anonymous mapping, touched): a tensor here could reuse memory the process already holds
        m = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, 64 * 2**20, mmap.PAGESIZE):
            m[i] = 1
        m.close()
    assert mem.peak - mem.start > 48
    with bench.PeakRSS() as quiet:  # the peak is this context's, not the process's so far
        pass
    assert quiet.peak - quiet.start < 16


def test_image_claims_exact_quick_claims_hold(tmp_path):
    """benchmarks/image_claims.py exact --quick: on exact 8x8 image mixtures (answers in closed form) the three claims
    hold with a margin of 3 standard errors of the sample size (N = 64): SMC's product of two mixtures of a narrow 1
    and a wide 7 is more often a 1 (exact: all) than the summed scores', p^2 shrinks the spread around each mode, a
    bound is never violated where reverse diffusion violates it."""
    bench = load_benchmark("image_claims")
    out = tmp_path / "exact"
    res = bench.main(["exact", "--quick", "--out", str(out)])
    rows = {r["row"]: r for r in res["rows"]}
    assert all(r["num_particles"] == 64 and r["nan_samples"] == 0 for r in rows.values())
    comp, rd = rows["compose: SMC+HMC1"], rows["compose: reverse diffusion"]
    assert comp["exact"] > 0.999 and comp["nfe"] == rd["nfe"]
    assert comp["claim_holds"], (comp["frac_1"], rd["frac_1"])
    cold, warm = rows["temperature: beta 2 (SMC budget)"], rows["temperature: beta 1 (reverse diffusion)"]
    assert cold["claim_holds"], (cold["msd"], warm["msd"])
    bound, free = rows["bound: SMC + Polytope+HMC1"], rows["bound: reverse diffusion"]
    assert bound["claim_holds"] and bound["violations"] == 0 < free["violations"]
    assert (out / "grid.png").is_file() and (out / "results.md").read_text().count("\n| ") == len(rows) + 1


@pytest.mark.parametrize("experiment", ["compose", "temperature", "bound"])
def test_image_claims_quick(experiment, trained, tmp_path):
    """benchmarks/image_claims.py --quick on the 2-step student: the rows each experiment promises, the baselines at
    the evaluations SMC used, no NaN sample, a hard bound never violated by what a row returns, table and grid."""
    bench = load_benchmark("image_claims")
    _, student = trained["digits_small"]
    out = tmp_path / experiment
    res = bench.main([experiment, "--quick", "--student", str(student), "--classifier", str(trained["classifier"]),
                      "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    rows = saved["rows"]
    assert rows == res["rows"] and (out / "grid.png").is_file() and "python benchmarks/image_claims.py" in \
        saved["meta"]["command"]
    assert (out / "results.md").read_text().count("\n| ") == len(rows) + 1
    ok = [r for r in rows if "error" not in r]
    assert all(r["nan_samples"] == 0 and r["peak_rss_mib"] > 0 for r in ok)
    if experiment == "compose":
        assert [r["row"] for r in rows] == [f"product {k}" for k in ("SMC", "SMC+HMC1", "SMC budget=32 (adaptive)",
                                                                      "reverse diffusion", "annealed HMC1")]
        smc_, smc_hmc, adaptive, rd, ahmc = rows
        assert all(r["num_particles"] == 8 and r["budget"] == 32 for r in rows)
        assert smc_["levels"] == rd["levels"] == 32 and smc_hmc["levels"] == ahmc["levels"] == 8  # 1 + 3 per level
        assert all(r["nfe"] <= 32 for r in rows) and smc_["nfe"] == rd["nfe"] == 32  # equal evaluations
        assert adaptive["plan"]["used_evaluations"] <= 32 and adaptive["plan"]["budget"] == 32
        assert smc_["mean_acceptance"] is None and 0 <= smc_hmc["mean_acceptance"] <= 1
        assert [r["per_level"] is None for r in rows] == [False, False, False, True, True]
        assert len(smc_["per_level"]["ess_frac"]) == len(smc_["per_level"]["sigma"]) == 32
        assert all(0 <= r["frac_y1"] + r["frac_y2"] <= 1 for r in rows)
    elif experiment == "temperature":
        assert [r.get("beta") for r in rows] == [None, 2.0, 4.0]
        assert rows[0]["log_Z"] is None and all(r["log_Z"] is not None for r in ok[1:])
        assert all(r["classifier_frechet"] >= 0 and 0 <= r["frac_class"] <= 1 for r in ok)
    else:
        assert [r["row"] for r in rows] == ["SMC + Polytope+HMC1", "reverse diffusion + rejection",
                                            "reverse diffusion + clip"]
        assert all(r["violations"] == 0 for r in ok)  # hard at the last level / rejected / projected
        assert rows[2]["num_returned"] == 8 and rows[1]["num_returned"] == rows[1]["num_accepted"] <= \
            rows[1]["num_proposed"]


def test_image_claims_bound_clip_meets_the_constraint():
    """The clipping baseline's map: violators darkened onto the half-space boundary, others untouched, pixels in
    range."""
    bench = load_benchmark("image_claims")
    poly = bench.constraint((1, 8, 8), 3, -0.8)
    x = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    x[:100] = x[:100] * 0.1 - 0.9  # about half inside
    inside = poly.contains(x.clamp(-1, 1).double())
    assert 0 < int(inside.sum()) < 200
    xc, changed = bench.clip_to_bound(x, 3, -0.8)
    assert torch.equal(changed, ~inside) and poly.contains(xc.double()).all()
    assert xc.min() >= -1 and xc.max() <= 1 and torch.equal(xc[inside], x[inside].clamp(-1, 1))
    assert torch.equal(xc[..., 3:], x[..., 3:].clamp(-1, 1))  # only the region moves
    mean_r = xc[~inside][..., :3].double().flatten(1).mean(1)
    assert torch.allclose(mean_r, torch.full_like(mean_r, -0.8), atol=1e-5)  # onto the boundary


def test_metrics_cli(trained, tmp_path):
    """python -m fkdiff.metrics: classifier scores of a samples.pt (dict with `resampled`), the shapes composition
    accuracy of exact renders (1 at the drawn positions, 0 elsewhere), clear errors on bad files."""
    from fkdiff.data.shapes import pixel_to_position, render
    from fkdiff.metrics.__main__ import load_images, main
    from fkdiff.metrics.classifier import _digits_split

    _, _, xva, yva = _digits_split(8, 0)
    torch.save({"resampled": xva[:32].float(), "samples": xva[:32].float()}, tmp_path / "samples.pt")
    out = main(["classifier", str(tmp_path / "samples.pt"), "--classifier", str(trained["classifier"]),
                "--out", str(tmp_path / "m.json")])
    assert out["num_samples"] == 32 and sum(out["class_counts"]) == 32 and out["classifier_frechet_distance"] >= 0
    assert json.loads((tmp_path / "m.json").read_text()) == out
    lab = int(yva[0])
    assert main(["classifier", str(tmp_path / "samples.pt"), "--classifier", str(trained["classifier"]),
                 "--label", str(lab)])["accuracy"] is not None
    centres = torch.tensor([[[4, 4], [11, 11]]])
    img = render(centres, torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), 16)
    torch.save(img, tmp_path / "shapes.pt")
    pos = pixel_to_position(centres[0], 16).tolist()
    args = ["shapes", str(tmp_path / "shapes.pt"), "--positions=" + ";".join(f"{x},{y}" for x, y in pos)]
    assert main(args)["accuracy"] == 1.0
    far = pixel_to_position(torch.tensor([[4, 11]]), 16)[0].tolist()
    assert main(["shapes", str(tmp_path / "shapes.pt"), f"--positions={far[0]},{far[1]}"])["accuracy"] == 0.0
    torch.save({"other": img}, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="--key"):
        load_images(tmp_path / "bad.pt")
    torch.save(torch.zeros(3, 8), tmp_path / "flat.pt")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        load_images(tmp_path / "flat.pt")
    with pytest.raises(SystemExit):
        main(["shapes", str(tmp_path / "shapes.pt"), "--positions", "0.5"])
    assert main(["shapes", str(tmp_path / "shapes.pt"), "--positions=" + ";".join(f"{x},{y}" for x, y in pos[:1])])[
        "positions"] == pos[:1]


def test_sample_cli_on_an_image_student(trained, tmp_path):
    """python -m fkdiff.sample recipe=digits_small_compose: eq. 13 of two classes of an image student as a recipe;
    the naive reverse diffusion beside it at equal evaluations; grid titled with the conditions and log Z."""
    from fkdiff.sample import run

    _, student = trained["digits_small"]
    cfg = compose(["recipe=digits_small_compose", "task=sample", f"sample.student={student}",
                   f"run_dir={tmp_path / 'run'}", "sample.num_particles=6", "sample.num_levels=3",
                   "sample.progress=false", "logger.kind=none"])
    assert cfg.sample.target == "conditional(uncond, [one, seven])" and cfg.sample.sigma_min == 0.05
    diag = run(cfg)
    saved = torch.load(tmp_path / "run" / "samples.pt")
    assert saved["resampled"].shape == (6, 1, 8, 8) and torch.isfinite(saved["resampled"]).all()
    assert diag["reverse_diffusion_levels"] == round(diag["nfe"]) > 3
    assert saved["reverse_diffusion"].shape == (6, 1, 8, 8)
    assert (tmp_path / "run" / "samples.png").is_file() and (tmp_path / "run" / "diagnostics.png").is_file()
    from fkdiff.sample import _conditions

    models = OmegaConf.to_container(cfg.sample.models, resolve=True)
    assert _conditions(models, cfg.sample.target) == "  [one: 1, seven: 7]"
    assert _conditions(models, "tempered(three, 2)") == "  [three: 3]" and _conditions(models, "uncond") == ""


def test_image_claims_shapes_quick(trained, tmp_path):
    """benchmarks/image_claims.py shapes --quick (Du et al. table 2) on the 2-step shapes student and teacher: every
    sampler row per number of objects, all at the same evaluations per particle, the teacher row on scores alone
    (annealed ULA), accuracies the detector's on what each row returned, table and grid."""
    bench = load_benchmark("image_claims")
    teacher, student = trained["shapes_small"]
    out = tmp_path / "shapes"
    res = bench.main(["shapes", "--quick", "--student", str(student), "--teacher", str(teacher), "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows == res["rows"] and (out / "grid.png").is_file()
    samplers = ["reverse diffusion (summed scores)", "annealed ULA", "annealed HMC", "SMC", "SMC+HMC",
                "teacher: annealed ULA (scores)"]
    assert [(r["objects"], r["sampler"]) for r in rows] == [(k, s) for k in (1, 2) for s in samplers]
    assert all("error" not in r and r["nan_samples"] == 0 and r["num_particles"] == 8 for r in rows)
    assert all(r["nfe"] == 8 for r in rows), [r["nfe"] for r in rows]  # equal evaluations per particle
    assert [r["levels"] for r in rows[:6]] == [8, 4, 2, 8, 2, 4]  # 1 / 1 + 1 (ULA) / 1 + 3 (HMC) per level
    assert [r["log_Z"] is None for r in rows[:6]] == [True, True, True, False, False, True]
    assert all(r["model"] == ("teacher" if "teacher" in r["sampler"] else "student") for r in rows)
    pos = bench.shapes_positions(16)
    for r in rows:
        assert r["positions"] == pos[:r["objects"]].tolist()
        acc, se = r["accuracy"], r["accuracy_se"]
        assert 0 <= acc <= 1 and se == pytest.approx(math.sqrt(acc * (1 - acc) / 8))
        assert len(r["per_position"]) == r["objects"] and acc <= min(r["per_position"])  # all hit <= each hit
        assert r["lineages"] == (r["num_eves"] if r["log_Z"] is not None else 8) and 1 <= r["num_distinct"] <= 8
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == (1 + len(samplers)) + (1 + len(rows)) and "| 1 object | 2 objects |" in md


def test_shapes_positions_are_valid_scenes():
    """The requested positions are object centres a real scene could have (inside the border, separated as the data
    are), and the detector finds every one of them on a rendered scene and nothing at them on an empty canvas."""
    from fkdiff.data.shapes import pixel_to_position, render
    from fkdiff.metrics import composition_accuracy

    bench = load_benchmark("image_claims")
    px = torch.tensor(bench.SHAPES_PIXELS)
    assert ((px >= 1) & (px <= 14)).all()
    d = (px[:, None] - px[None]).abs().max(-1).values + 100 * torch.eye(len(px), dtype=torch.long)
    assert d.min() >= 4
    pos = bench.shapes_positions(16)
    torch.testing.assert_close(pos, pixel_to_position(px, 16))
    scene = render(px[None], torch.tensor([[0, 1, 0, 1, 0]]), torch.tensor([[0, 1, 2, 3, 4]]), 16)
    assert composition_accuracy(scene, pos).accuracy == 1.0
    assert composition_accuracy(-torch.ones_like(scene), pos[:1]).accuracy == 0.0
