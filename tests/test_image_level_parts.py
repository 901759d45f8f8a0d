"""benchmarks/image_level_parts.py and image_teacher_loops.py: the line integral of a score that is the gradient of an
energy returns that energy's difference, so a triangle loop of it closes (what the teacher-loop columns rely on)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import image_level_parts as parts  # noqa: E402

from fkdiff.energy import build_student  # noqa: E402


def test_line_integral_of_an_energy_students_score_is_its_energy_difference_and_loops_close():
    torch.manual_seed(0)  # the student's weights
    st = build_student((1, 8, 8), 0.8, "l2", backbone={"kind": "unet", "channels": [4, 8], "emb_dim": 16,
                                                       "noise_scale": 16}, cond_kind="class", num_classes=10)
    st.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 1, 8, 8, generator=g)
    cc = torch.full((6,), 3)
    sigma = 0.2
    den = lambda xx, ss, c: st(xx, ss, c)  # noqa: E731  D = x - sigma^2 grad E
    ab = parts._line(den, x[0], x[1], sigma, cc, n=16)
    with torch.no_grad():
        direct = (st.energy(x[0], sigma, cc) - st.energy(x[1], sigma, cc)).double()
    torch.testing.assert_close(ab, direct, atol=1e-2 * (1 + direct.abs().max().item()), rtol=0)
    loop = ab - parts._line(den, x[0], x[2], sigma, cc, n=16) - parts._line(den, x[2], x[1], sigma, cc, n=16)
    assert loop.abs().max() < 1e-2 * (1 + direct.abs().max().item()), loop
    # a rotational field (the score plus a rotation of it) does not close
    rot = lambda xx, ss, c: den(xx, ss, c) + 0.05 * torch.roll(xx, 1, dims=-1)  # noqa: E731
    bad = parts._line(rot, x[0], x[1], sigma, cc, n=16) - parts._line(rot, x[0], x[2], sigma, cc, n=16) - \
        parts._line(rot, x[2], x[1], sigma, cc, n=16)
    assert bad.abs().max() > 10 * loop.abs().max() + 1.0, (bad, loop)
