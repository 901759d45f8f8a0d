"""Datamodules (toy2d, shapes, digits, cifar10), the registry, the step-indexed train order, and the shapes detector."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from types import SimpleNamespace

from fkdiff.data import DATAMODULES, StepBatches, build_datamodule
from fkdiff.data import shapes as S
from fkdiff.data.sources import CIFAR10_URL
from fkdiff.seeding import seeded_generator
from teachers import make_preset
from conftest import write_cifar


def _first(dm, split="train"):
    return next(iter(dm.train_dataloader() if split == "train" else dm.val_dataloader()))


def _check_contract(dm):
    for split in ("train", "val"):
        b = _first(dm, split)
        assert b["x"].dtype == torch.float32
        assert tuple(b["x"].shape[1:]) == dm.event_shape
        if dm.cond_kind == "none":
            assert "cond" not in b
        elif dm.cond_kind == "class":
            assert b["cond"].dtype == torch.long and b["cond"].shape == b["x"].shape[:1]
            assert 0 <= b["cond"].min() and b["cond"].max() < dm.num_classes
        else:
            assert b["cond"].dtype == torch.float32 and b["cond"].shape == (b["x"].shape[0], dm.cond_dim)
    assert isinstance(dm.sigma_data, float) and dm.sigma_data > 0


# ------------------------------------------------------------------------------------------------ registry, contract


def test_registry_and_bad_arguments():
    from fkdiff.training import build_datamodule_from_config

    ring = make_preset("ring8")
    assert set(DATAMODULES) == {"toy2d", "shapes", "digits", "cifar10", "moons"}
    with pytest.raises(KeyError, match="available: cifar10, digits, moons, shapes, toy2d"):
        build_datamodule("mnist")
    with pytest.raises(TypeError, match="unexpected argument.*bogus.*accepts:.*preset"):
        build_datamodule("toy2d", bogus=1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        build_datamodule("toy2d", preset=ring, batch_size=0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        build_datamodule("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="power of two"):
        build_datamodule("digits", size=12)
    with pytest.raises(ValueError, match="power of two"):
        build_datamodule("shapes", canvas=20)
    # preset names are resolved by the config wiring (teachers.make_preset), not by fkdiff.data
    with pytest.raises(KeyError, match="unknown 2D preset"):
        build_datamodule_from_config({"name": "toy2d", "preset": "nope"})
    with pytest.raises(TypeError, match="preset must be.*teachers.make_preset"):
        build_datamodule("toy2d", preset="ring8")
    with pytest.raises(TypeError, match="preset must be"):
        build_datamodule("toy2d", preset=3)


def _attach(dm, step=0, rank=0, world_size=1):
    """What Lightning's Trainer gives a datamodule: the attributes the train loader reads."""
    dm.trainer = SimpleNamespace(global_step=step, global_rank=rank, world_size=world_size)
    return dm


def _epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=seeded_generator(seed, epoch, 0, "data"))


def test_train_order_is_pure_function_of_seed_and_step():
    """Step k takes the next batch of the permutation of its epoch, drawn from (seed, epoch); the order does not
    depend on what was iterated before (a loader started at step k gives the batches of an uninterrupted one), and the
    loader leaves the global RNG alone."""
    dm = build_datamodule("toy2d", preset=make_preset("ring8"), num_samples=64, batch_size=8, seed=5,
                          val_fraction=0.25)
    state = torch.random.get_rng_state()
    it = iter(dm.train_dataloader())
    xs = [next(it)["x"] for _ in range(12)]  # two epochs of 6 steps (48 training examples)
    assert torch.equal(torch.random.get_rng_state(), state)
    for epoch in range(2):
        ref = dm.train_set.x[_epoch_order(48, 5, epoch)]
        assert torch.equal(torch.cat(xs[6 * epoch: 6 * (epoch + 1)]), ref)
    assert not torch.equal(torch.cat(xs[:6]), torch.cat(xs[6:]))  # each epoch its own permutation
    resumed = iter(_attach(dm, step=7).train_dataloader())
    assert torch.equal(next(resumed)["x"], xs[7])
    other = StepBatches(dm.train_set, 8, seed=4)  # another seed, another order of the same examples
    assert not torch.equal(other.indices(0), _epoch_order(48, 5, 0)[:8])


def test_ddp_ranks_share_the_global_batch():
    """Rank r of w gets rows r, r + w, ... of the single-process global batch, so w processes see the same data as
    one; workers interleave steps without changing the sequence."""
    dm = build_datamodule("toy2d", preset=make_preset("ring8"), num_samples=40, batch_size=4, seed=1,
                          val_fraction=0.1)
    single = iter(dm.train_dataloader())
    full = [next(single)["x"] for _ in range(12)]
    ranks = [iter(_attach(build_datamodule("toy2d", preset=make_preset("ring8"), num_samples=40, batch_size=4,
                                           seed=1, val_fraction=0.1), rank=r, world_size=2).train_dataloader())
             for r in range(2)]
    for k in range(12):
        parts = [next(it)["x"] for it in ranks]
        assert torch.equal(torch.stack(parts, 1).reshape(-1, 2), full[k])
    with pytest.raises(ValueError, match="not divisible"):
        iter(_attach(dm, world_size=3).train_dataloader())
    workers = build_datamodule("toy2d", preset=make_preset("ring8"), num_samples=40, batch_size=4, seed=1,
                               val_fraction=0.1, num_workers=2)
    it = iter(workers.train_dataloader())
    assert all(torch.equal(next(it)["x"], full[k]) for k in range(12))


def test_lightning_fit_sees_dict_batches_in_step_order(tmp_path):
    import lightning.pytorch as pl

    dm = build_datamodule("toy2d", preset=make_preset("ring8"), num_samples=40, batch_size=9, seed=2,
                          val_fraction=0.1)
    seen = []

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, i):
            seen.append((self.global_step, batch["x"].clone()))
            return (self.w * batch["x"].sum()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = pl.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path, use_distributed_sampler=False)
    trainer.fit(Probe(), datamodule=dm)
    assert [k for k, _ in seen] == list(range(10))
    order = StepBatches(dm.train_set, 9, seed=2)  # 36 examples: 4 steps per epoch
    for k, x in seen:
        assert torch.equal(x, dm.train_set.x[order.indices(k)])


# ------------------------------------------------------------------------------------------------ toy2d


def test_toy2d_samples_the_teacher():
    dm = build_datamodule("toy2d", preset=make_preset("ring8"), num_samples=20000, batch_size=256, seed=0)
    _check_contract(dm)
    assert dm.event_shape == (2,) and dm.cond_kind == "none" and dm.num_classes is None and dm.cond_dim is None
    x = torch.cat([dm.train_set.x, dm.val_set.x]).double()
    assert len(dm.train_set) == 18000 and len(dm.val_set) == 2000
    # moments of the exact teacher; per-coordinate mean has standard error sqrt(var / n): allow 5 of them
    mean, cov = dm.teacher.mean(), dm.teacher.covariance()
    se = (torch.diagonal(cov) / len(x)).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all()
    # every sample lies near a ring mode (std 0.05 -> within 6 std of radius 0.5)
    assert ((x.norm(dim=1) - 0.5).abs() < 0.3).all()
    # sigma_data is the RMS about zero: sqrt((trace Cov + |mean|^2) / d)
    assert math.isclose(dm.sigma_data, float(((torch.diagonal(cov).sum() + mean.square().sum()) / 2).sqrt()),
                        rel_tol=1e-12)
    # deterministic from the seed, different across seeds
    again = build_datamodule("toy2d", preset=make_preset("ring8"), num_samples=20000, seed=0)
    again.setup()
    assert torch.equal(again.train_set.x, dm.train_set.x)
    other = build_datamodule("toy2d", preset=make_preset("ring8"), num_samples=20000, seed=1)
    other.setup()
    assert not torch.equal(other.train_set.x, dm.train_set.x)


def test_toy2d_accepts_a_teacher_object():
    from teachers import Box

    box = Box([0.0, -1.0], [2.0, 1.0])
    dm = build_datamodule("toy2d", preset=box, num_samples=1000, batch_size=100)
    _check_contract(dm)
    assert dm.teacher is box
    x = dm.train_set.x
    assert box.contains(x.double()).all()
    # sigma_data = RMS about zero = sqrt(mean over coordinates of (var + mean^2)) = sqrt((4/12 + 1 + 4/12) / 2)
    assert math.isclose(dm.sigma_data, math.sqrt((4 / 12 + 1 + 4 / 12) / 2), rel_tol=1e-12)
    # a preset name with keyword arguments, as the config gives it (data.preset, data.preset_kwargs)
    from fkdiff.training import build_datamodule_from_config

    dm = build_datamodule_from_config({"name": "toy2d", "preset": "ring8", "preset_kwargs": {"radius": 2.0},
                                       "num_samples": 100})
    dm.setup()
    assert ((dm.train_set.x.norm(dim=1) - 2.0).abs() < 0.5).all()


# ------------------------------------------------------------------------------------------------ moons


def test_moons_through_the_config_and_a_teacher_run(tmp_path):
    """data=moons: the config file builds the datamodule; two half circles of radius 1 around (-0.5, -0.25) and
    (0.5, 0.25) after centring, Gaussian noise of std 0.05 (every point within 6 std of one circle), deterministic
    from the seed; a teacher trains on it through the real entry-point function."""
    from fkdiff.recipes import compose
    from fkdiff.training import build_datamodule_from_config
    from teachers import load_teacher
    from teachers.train import train

    cfg = compose(["data=moons", "data.num_samples=4000"])
    dm = build_datamodule_from_config(cfg.data)
    _check_contract(dm)
    assert dm.event_shape == (2,) and dm.cond_kind == "none" and len(dm.train_set) == 3600
    x = torch.cat([dm.train_set.x, dm.val_set.x]).double()
    d = torch.stack([(x - torch.tensor(c, dtype=x.dtype)).norm(dim=1) for c in ((-0.5, -0.25), (0.5, 0.25))], 1)
    assert ((d - 1).abs().min(1).values < 6 * 0.05).all()
    assert 0.45 < ((d[:, 0] - 1).abs() < (d[:, 1] - 1).abs()).double().mean() < 0.55  # two equal halves
    again = build_datamodule_from_config(cfg.data)
    again.setup()
    assert torch.equal(again.train_set.x, dm.train_set.x)
    other = build_datamodule_from_config(compose(["data=moons", "data.num_samples=4000", "seed=1"]).data)
    other.setup()
    assert not torch.equal(other.train_set.x, dm.train_set.x)
    path = train(compose(["recipe=toy2d", "task=train_teacher", "data=moons", "data.num_samples=1000",
                          f"run_dir={tmp_path}", "train_teacher.max_steps=2", "train_teacher.backbone.width=16",
                          "logger=none", "trainer.enable_progress_bar=false", "+trainer.limit_val_batches=0",
                          "+trainer.enable_model_summary=false"]))
    assert load_teacher(path).event_shape == (2,)


# ------------------------------------------------------------------------------------------------ shapes


def test_shapes_generation_geometry_and_determinism():
    g = torch.Generator().manual_seed(0)
    s = S.generate_shapes(2000, canvas=16, min_objects=1, max_objects=5, generator=g)
    assert s.images.shape == (2000, 3, 16, 16) and s.images.dtype == torch.float32
    assert s.images.min() == -1 and s.images.max() == 1
    # counts cover 1..5 (each has prob 1/5; P(one missing in 2000) is ~1e-193)
    assert set(s.counts.tolist()) == {1, 2, 3, 4, 5}
    r = S.default_radius(16)
    for i in range(200):
        c = s.centres[i, : s.counts[i]]
        assert (c >= r).all() and (c <= 15 - r).all()
        d = (c[:, None] - c[None]).abs().amax(-1) + 100 * torch.eye(len(c), dtype=torch.long)
        assert (d >= 2 * r + 2).all()  # separation: no overlap, no contact
    # foreground pixel count equals the sum of footprints (objects do not overlap): square 9, plus 5 at r=1
    fg = (s.images.amax(1) > 0).sum((1, 2))
    expect = ((s.kinds == 0) * 9 + (s.kinds == 1) * 5).sum(1)
    assert torch.equal(fg, expect)
    # positions are the normalised pixel centres and round-trip
    ok = ~s.positions.isnan().any(-1)
    assert torch.allclose(S.position_to_pixel(s.positions[ok], 16), s.centres[ok].float())
    assert s.positions[ok].abs().max() < 1
    s2 = S.generate_shapes(2000, canvas=16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s2.images, s.images) and torch.equal(s2.centres, s.centres)
    s3 = S.generate_shapes(2000, canvas=16, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(s3.images, s.images)
    with pytest.raises(ValueError, match="could not place"):
        S.generate_shapes(1, canvas=16, min_objects=5, max_objects=5, min_separation=12,
                          generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="min_objects"):
        S.generate_shapes(1, canvas=16, min_objects=3, max_objects=2)


@pytest.mark.parametrize("canvas", [16, 32])
def test_detector_exact_on_clean_data(canvas):
    s = S.generate_shapes(9600 // canvas, canvas=canvas, generator=torch.Generator().manual_seed(canvas))
    # 1) the centre map is exactly the set of true centres
    cmap = S.centre_map(s.images)
    truth = torch.zeros_like(cmap)
    ok = s.kinds >= 0
    n_idx = torch.arange(len(s.counts))[:, None].expand_as(s.kinds)[ok]
    truth[n_idx, s.centres[ok][:, 0], s.centres[ok][:, 1]] = True
    assert torch.equal(cmap, truth)
    # 2) every object of every image is detected at its position (100%)
    imgs = s.images[n_idx]
    assert S.detect(imgs, s.positions[ok]).all()
    # ... also when the requested position is off by up to tol = 1 pixel (sub-pixel and whole-pixel offsets)
    px = 2.0 / canvas
    shift = torch.tensor([px, -px])
    assert S.detect(imgs, s.positions[ok] + shift).all()
    assert S.detect(imgs, s.positions[ok] + 0.4 * px).all()
    # 3) composition accuracy over all objects = 1
    assert S.composition_accuracy(s.images, s.positions) == 1.0
    # 4) empty canvases: 0%
    empty = -torch.ones(len(n_idx), 3, canvas, canvas)
    assert not S.detect(empty, s.positions[ok]).any()
    assert S.composition_accuracy(-torch.ones_like(s.images), s.positions) == 0.0
    # 5) positions with no object within tol: 0% (all pixel centres farther than 1 pixel from every object centre)
    g = torch.Generator().manual_seed(7)
    rc = torch.randint(0, canvas, (len(s.counts), 2), generator=g)
    cheb = (rc[:, None] - s.centres).abs().amax(-1).masked_fill(~ok, 10**6).amin(1)
    far = cheb > 1
    assert far.sum() > len(far) // 2
    assert not S.detect(s.images[far], S.pixel_to_position(rc[far], canvas)).any()
    # ... and exactly 2 pixels away from a real object (the nearest miss): also rejected
    two = s.positions[ok] + torch.tensor([2 * px, 0.0])
    inside = two[:, 0] < 1
    near_other = (S.position_to_pixel(two, canvas).round().long()[:, None] - s.centres[n_idx]).abs().amax(-1)
    near_other = near_other.masked_fill(~ok[n_idx], 10**6).amin(1) <= 1
    keep = inside & ~near_other
    assert keep.sum() > len(keep) // 10
    assert not S.detect(imgs[keep], two[keep]).any()
    # NaN positions are ignored by composition accuracy but never detected
    assert not S.detect(imgs[:3], torch.full((3, 2), float("nan"))).any()


def test_detector_rejects_blobs_and_bad_input():
    # a canvas filled with colour has a full core everywhere but no background ring: no object
    full = torch.ones(2, 3, 16, 16)
    assert not S.detect(full, torch.zeros(2, 2)).any()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        S.detect(torch.zeros(2, 1, 16, 16), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        S.detect(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch size"):
        S.detect(torch.zeros(2, 3, 16, 16), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="floating point"):
        S.detect(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, 2))


def test_shapes_datamodule():
    dm = build_datamodule("shapes", num_samples=300, batch_size=64, seed=3, val_fraction=0.2)
    _check_contract(dm)
    assert dm.event_shape == (3, 16, 16) and dm.cond_kind == "position" and dm.cond_dim == 2
    assert dm.num_train_images == 240
    # one example per (image, object) pair
    assert len(dm.train_set) == int(dm.scenes.counts[:240].sum())
    assert len(dm.val_set) == int(dm.scenes.counts[240:].sum())
    # every example's cond is an object of its image: the detector finds it
    b = next(iter(dm.train_dataloader()))
    assert S.detect(b["x"], b["cond"]).all()
    assert b["cond"].abs().max() < 1
    # every (image, object) pair appears exactly once per epoch
    pairs = {(int(r), tuple(c.tolist())) for r, c in zip(dm.train_set.rows, dm.train_set.cond)}
    assert len(pairs) == len(dm.train_set)
    sd = float(dm.scenes.images[:240].double().pow(2).mean().sqrt())  # RMS about zero
    assert math.isclose(dm.sigma_data, sd, rel_tol=1e-12)
    dm32 = build_datamodule("shapes", canvas=32, num_samples=50, batch_size=16)
    _check_contract(dm32)
    b = next(iter(dm32.train_dataloader()))
    assert b["x"].shape[1:] == (3, 32, 32) and S.detect(b["x"], b["cond"]).all()


# ------------------------------------------------------------------------------------------------ digits


def test_digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    dm = build_datamodule("digits", batch_size=64, seed=0)
    _check_contract(dm)
    assert dm.event_shape == (1, 16, 16) and dm.cond_kind == "class" and dm.num_classes == 10
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == round(0.1 * 1797)
    x = torch.cat([dm.train_set.x, dm.val_set.x])
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    # native size keeps the images exactly (v / 8 - 1), and the labels travel with them
    dm8 = build_datamodule("digits", size=8, seed=0)
    dm8.setup()
    ref = torch.as_tensor(raw.images, dtype=torch.float32) / 8 - 1
    y = torch.as_tensor(raw.target)
    for ds in (dm8.train_set, dm8.val_set):
        match = (ds.x[:, 0, None] == ref[None]).flatten(2).all(2)  # [n, 1797]
        assert match.any(1).all()
        assert torch.equal(y[match.float().argmax(1)], ds.cond)
    # 16x16 is bilinear x2 (align_corners=False): output 2i = x[i-1]/4 + 3x[i]/4, 2i+1 = 3x[i]/4 + x[i+1]/4 (edges
    # clamped), so 2x2 average pooling gives back the native image blurred by [1/8, 3/4, 1/8] per axis, exactly
    dm.setup()
    pooled = torch.nn.functional.avg_pool2d(dm.train_set.x, 2)
    k = torch.tensor([0.125, 0.75, 0.125])
    native = torch.nn.functional.pad(dm8.train_set.x, (1, 1, 1, 1), mode="replicate")
    blurred = torch.nn.functional.conv2d(native, torch.outer(k, k)[None, None])
    assert torch.allclose(pooled, blurred, atol=1e-6)
    # deterministic split from the seed; another seed splits differently; disjoint train/val
    again = build_datamodule("digits", seed=0)
    again.setup()
    assert torch.equal(again.val_set.x, dm.val_set.x)
    other = build_datamodule("digits", seed=1)
    other.setup()
    assert not torch.equal(other.val_set.x, dm.val_set.x)
    assert math.isclose(dm.sigma_data, float(dm.train_set.x.double().pow(2).mean().sqrt()), rel_tol=1e-12)


# ------------------------------------------------------------------------------------------------ cifar10


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_reads_synthetic_pickles(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = write_cifar(folder)
    dm = build_datamodule("cifar10", root=str(tmp_path), batch_size=7)
    _check_contract(dm)
    assert dm.event_shape == (3, 32, 32) and dm.num_classes == 10 and dm.cond_kind == "class"
    assert len(dm.train_set) == 30 and len(dm.val_set) == 6
    assert dm.class_names[0] == "airplane" and len(dm.class_names) == 10
    # exact decoding: row-major [3, 32, 32] (channel planes), x / 127.5 - 1, labels in order
    raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    lab = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    b = dm.train_set.__getitems__(list(range(30)))
    ref = torch.as_tensor(raw.reshape(30, 3, 32, 32), dtype=torch.float32) / 127.5 - 1
    assert torch.equal(b["x"], ref) and b["cond"].tolist() == lab
    v = next(iter(dm.val_dataloader()))  # val = test_batch, in order
    assert torch.equal(v["x"], torch.as_tensor(batches["test_batch"][b"data"].reshape(6, 3, 32, 32)).float() / 127.5 - 1)
    exact = torch.as_tensor(raw, dtype=torch.float64) / 127.5 - 1  # the histogram computes in float64
    assert math.isclose(dm.sigma_data, float(exact.pow(2).mean().sqrt()), rel_tol=1e-12)


def test_cifar10_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_datamodule("cifar10", root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "data_batch_1" in msg and "test_batch" in msg and "batches.meta" in msg
    assert CIFAR10_URL in msg and str(tmp_path / "nowhere") in msg
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3 in .*cifar-10-batches-py"):
        build_datamodule("cifar10", root=str(tmp_path))
    with pytest.raises(ValueError, match="root is required"):
        build_datamodule("cifar10")
    # a file in the wrong format says so
    bad = tmp_path / "bad"
    write_cifar(bad)
    with open(bad / "data_batch_1", "wb") as f:
        pickle.dump({b"wrong": 1}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        build_datamodule("cifar10", root=str(bad)).setup()
