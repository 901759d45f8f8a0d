"""Image metrics (fkdiff.metrics): the digits classifier (held-out accuracy, per-sample confidence/entropy), the
Fréchet distance against closed forms, FID/KID's clear errors where torchmetrics' Inception metrics do not import
(and a run where they do), and the shapes composition accuracy on exact renders."""

from __future__ import annotations

import math

import pytest
import torch

from fkdiff import metrics as M
from fkdiff.data.shapes import generate_shapes, pixel_to_position, render


@pytest.fixture(scope="module")
def clf():
    """The digits classifier at 8x8 from seed 0, on half the default steps (200: ~8 s of CPU; the default's 400 cost
    ~21 s and are tested in the slow suite)."""
    return M.train_digits_classifier(8, seed=0, steps=200)


def test_classifier_held_out_accuracy(clf):
    """200 steps, measured: 0.972 on the 180 held-out digits (train 0.959); chance is 0.1."""
    assert clf.report["num_val"] == 180 and clf.report["num_train"] == 1617
    assert clf.report["val_accuracy"] >= 0.95


@pytest.mark.slow
def test_default_classifier_held_out_accuracy():
    """The default (400 steps, seed 0) that the benchmarks use, measured: 0.994 held out (train 0.990)."""
    c = M.train_digits_classifier(8, seed=0)
    assert c.report["val_accuracy"] >= 0.98


def test_classifier_is_a_function_of_the_seed(clf, tmp_path):
    again = M.train_digits_classifier(8, seed=0, steps=5)
    other = M.train_digits_classifier(8, seed=1, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                  M.train_digits_classifier(8, seed=0, steps=5).state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), other.state_dict().values()))
    path = M.save_classifier(clf, tmp_path / "clf.pt")
    loaded = M.load_classifier(path)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), clf(x))
    assert loaded.report == clf.report
    torch.save({"format": "something else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a digits classifier"):
        M.load_classifier(tmp_path / "bad.pt")


def test_classifier_scores_on_real_and_noise(clf):
    """Real held-out digits: confident and right; pure noise images: far less confident, higher entropy."""
    from fkdiff.metrics.classifier import _digits_split

    _, _, xva, yva = _digits_split(8, 0)
    real = M.classifier_scores(clf, xva, yva)
    assert real.accuracy == pytest.approx(clf.report["val_accuracy"])
    assert real.probs.shape == (180, 10) and torch.allclose(real.probs.sum(1), torch.ones(180, dtype=torch.float64))
    assert ((real.entropy >= 0) & (real.entropy <= math.log(10) + 1e-9)).all()
    assert real.mean_confidence > 0.85
    noise = M.classifier_scores(clf, torch.rand(180, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise.accuracy is None and noise.label_prob is None
    assert noise.mean_entropy > real.mean_entropy + 0.3
    one = M.classifier_scores(clf, xva[:5], 3)
    assert one.label_prob.shape == (5,)
    with pytest.raises(ValueError, match="labels"):
        M.classifier_scores(clf, xva[:5], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        M.classifier_scores(clf, torch.zeros(2, 1, 16, 16))


def test_gaussian_frechet_distance_closed_form():
    """Commuting covariances: d^2 = |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 (any rotation of both)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    a, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    m1, m2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    exact = float((m1 - m2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    got = M.gaussian_frechet_distance(m1, q @ torch.diag(a) @ q.T, m2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(exact, rel=1e-10)
    # a non-commuting pair in 1D-per-block form: 2x2 with known answer (rank-one vs identity)
    c1 = torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64))
    c2 = torch.eye(2, dtype=torch.float64)
    assert M.gaussian_frechet_distance(torch.zeros(2), c1, torch.zeros(2), c2) == pytest.approx(4 + 2 - 2 * 2, abs=1e-9)
    assert M.gaussian_frechet_distance(m1[:2], c2, m1[:2], c2) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_from_samples():
    """Sample estimate within Monte Carlo error of the exact value; two draws of one law give ~ d/N-size values."""
    g = torch.Generator().manual_seed(1)
    n, d = 20000, 3
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64) + 1.0
    exact = d * 1.0 + d * (2.0 - 1.0) ** 2  # |mean diff|^2 = 3, sum (2 - 1)^2 = 3
    assert M.frechet_distance(a, b) == pytest.approx(exact, abs=0.1)  # sd of the estimate ~ 0.03 at n = 20000
    same = M.frechet_distance(a, torch.randn(n, d, generator=g, dtype=torch.float64))
    assert 0 <= same < 0.01
    with pytest.raises(ValueError, match="same d"):
        M.frechet_distance(a, b[:, :2])


def test_classifier_frechet_distance_orders_sets(clf):
    """Held-out digits are closer to the train digits than blurred digits are, and noise is farthest."""
    from fkdiff.metrics.classifier import _digits_split

    xtr, _, xva, _ = _digits_split(8, 0)
    blur = torch.nn.functional.avg_pool2d(xva, 3, stride=1, padding=1, count_include_pad=False)
    noise = torch.rand(180, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    d_real = M.classifier_frechet_distance(clf, xva, xtr)
    d_blur = M.classifier_frechet_distance(clf, blur, xtr)
    d_noise = M.classifier_frechet_distance(clf, noise, xtr)
    assert d_real < d_blur < d_noise


# ---------------------------------------------------------------------------------------------------------------------
# FID / KID


@pytest.mark.skipif(M.fid_available(), reason="torchmetrics' Inception metrics import here")
def test_fid_kid_clear_error_where_it_does_not_import(tmp_path):
    """Here (ENVIRONMENT.md: torchvision does not import beside the CPU torch) the error says what to install (the
    weights, checked first, are a plain weights file)."""
    x = torch.zeros(4, 3, 16, 16)
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    with pytest.raises(M.FIDUnavailableError, match=r"pip install 'fkdiff\[fid\]'.*torchvision") as e:
        M.fid_kid(x, x, weights_path=tmp_path / "weights.pth")
    assert torch.__version__ in str(e.value)
    assert isinstance(e.value, ImportError)


def test_inception_weights_missing_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        M.inception_weights_path()
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / M.inception.INCEPTION_WEIGHTS_FILE) in msg
    assert M.inception.INCEPTION_WEIGHTS_URL in msg
    with pytest.raises(FileNotFoundError, match="not found at"):
        M.inception_weights_path(tmp_path / "nope.pth")
    f = tmp_path / "hub" / "checkpoints" / M.inception.INCEPTION_WEIGHTS_FILE
    f.parent.mkdir(parents=True)
    f.write_bytes(b"")  # there, but not a weights file: refused (the one check of both FID paths, test_fid.py)
    with pytest.raises(ValueError, match="not a plain weights file"):
        M.inception_weights_path()
    torch.save({"w": torch.zeros(2)}, f)
    assert M.inception_weights_path() == f


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    u = M.to_uint8_rgb(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 2, 2)
    assert u[0, 0].flatten().tolist() == [0, 128, 255, 255] and torch.equal(u[0, 0], u[0, 2])
    with pytest.raises(ValueError, match="1 or 3"):
        M.to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def _weights_present() -> bool:
    try:
        M.inception_weights_path()
    except (FileNotFoundError, ValueError):
        return False
    return True


@pytest.mark.skipif(not (M.fid_available() and _weights_present()),
                    reason="needs the `fid` extra importable and the Inception weights in the torch hub cache")
def test_fid_kid_where_available():
    """Identical sets: FID ~ 0 and KID ~ 0; a set against noise: both clearly positive."""
    g = torch.Generator().manual_seed(0)
    s = generate_shapes(64, 16, generator=g).images
    noise = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    same = M.fid_kid(s, s, kid_subset_size=32)
    diff = M.fid_kid(s, noise, kid_subset_size=32)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 1e-2
    assert diff["fid"] > 10 and diff["kid_mean"] > 10 * max(same["kid_std"], 1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# shapes composition accuracy


def test_composition_accuracy_exact_on_renders():
    """Clean renders: every object's position is found; a requested empty position is not; counts are exact."""
    s = generate_shapes(200, 16, generator=torch.Generator().manual_seed(0))
    sc = M.composition_accuracy(s.images, s.positions)  # NaN slots (absent objects) are ignored
    assert sc.accuracy == 1.0 and sc.se == 0.0
    assert torch.equal(sc.num_objects, s.counts)
    # the same images asked for a position at least 3 px from every object: never found
    grid = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(-1, 2)
    far = []
    for i in range(200):
        c = s.centres[i, : s.counts[i]]
        ok = (grid[:, None] - c[None]).abs().amax(-1).amin(1) >= 3
        far.append(grid[ok][0])
    far_pos = pixel_to_position(torch.stack(far), 16)[:, None]
    none = M.composition_accuracy(s.images, far_pos)
    assert none.accuracy == 0.0
    both = M.composition_accuracy(s.images, torch.cat([s.positions[:, :1], far_pos], 1))
    assert both.accuracy == 0.0 and both.per_position.tolist() == [1.0, 0.0]


def test_composition_accuracy_shared_positions_and_se():
    """Positions [M, 2] shared by the batch; half the images hold both objects: accuracy 0.5, binomial se."""
    canvas = 16
    centres = torch.tensor([[4, 4], [11, 11]])
    kinds, colours = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    full = render(centres[None], kinds, colours, canvas)
    half = render(centres[None, :1], kinds[:, :1], colours[:, :1], canvas)
    imgs = torch.cat([full.expand(10, -1, -1, -1), half.expand(10, -1, -1, -1)])
    pos = pixel_to_position(centres, canvas)
    sc = M.composition_accuracy(imgs, pos)
    assert sc.accuracy == 0.5 and sc.se == pytest.approx(math.sqrt(0.25 / 20))
    assert sc.per_position.tolist() == [1.0, 0.5]
    assert sc.num_objects.tolist() == [2] * 10 + [1] * 10
    with pytest.raises(ValueError, match="batch size"):
        M.composition_accuracy(imgs, pos[None].expand(3, -1, -1))
    with pytest.raises(ValueError, match=r"\[M, 2\]"):
        M.composition_accuracy(imgs, torch.zeros(20, 2, 2, 2))


def test_object_count_merges_plateaus():
    """A blurry object can give a plateau of centre pixels: counted once (8-connected)."""
    cmap = torch.zeros(2, 8, 8, dtype=torch.bool)
    cmap[0, 1:3, 1:3] = True   # one 2x2 plateau
    cmap[0, 5, 5] = True       # a separate centre
    cmap[1, 2, 2] = cmap[1, 3, 3] = True  # diagonal neighbours: one group
    from fkdiff.metrics.composition import _count_centres

    assert _count_centres(cmap).tolist() == [2, 1]
