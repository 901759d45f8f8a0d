"""Cost of the cifar10 recipe's student on google/ddpm-cifar10-32's UNet architecture (issue 11 benchmarks).

The network is a `UNet2DModel` with the public model's config (`teachers.hub.DDPM_CIFAR10_UNET_CONFIG`, 35.7M
parameters) and seeded random weights (timing does not depend on the values; nothing is downloaded), behind
`teachers.adapters.from_diffusers` on the linear 1000-step schedule; the student is `student_from_teacher` (g = ip over a
copy of that network). Timed, median of `--repeats` after a warm-up:

  teacher_forward      D(x, sigma) without a graph (what a plain sampler pays per step)
  energy_and_score     the student's E and -grad_x E without a graph (what SMC pays per level); target <= 2.5x the
                       teacher forward (one forward + one backward is the floor)
  teacher_dsm_step     a denoising-score-matching step of the teacher (forward + backward + Adam)
  distill_step         a distillation step of the student (loss on grad_x E: double backward + Adam)
  smc_level            one SMC level (no MCMC) of N particles: particle-steps/s; peak memory on a GPU

CPU always (fp32; bf16 autocast where asked); on a GPU also bf16 + channels_last (+ compile with --compile) and
N = 256 / 1024 particles. The machine is named in the output.

    python benchmarks/cifar10_fast_path.py [--device cuda] [--batch 8] [--particles 8] [--bf16] [--compile]
Writes benchmarks/results/cifar10_fast_path_<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats):
    fn()  # warm-up (compilation, allocator)
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def build(device):
    from diffusers import UNet2DModel

    from fkdiff.energy import student_from_teacher
    from teachers.adapters import from_diffusers
    from teachers.hub import DDPM_CIFAR10_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_UNET_CONFIG)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    teacher = from_diffusers(unet, alphas_cumprod=torch.cumprod(1 - betas, 0), prediction="eps").to(device)
    student = student_from_teacher(teacher).to(device)
    return teacher.eval(), student.eval(), sum(p.numel() for p in unet.parameters())


def run(device, batch, particles, repeats, precision, channels_last, compile_):
    from fkdiff import smc
    from fkdiff.diffusion import checked_sigma

    teacher, student, n_params = build(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen, device=device)
    sigma = checked_sigma(torch.full((batch,), 0.5, device=device))
    rows = {}
    with torch.no_grad():
        rows["teacher_forward"] = _time(lambda: teacher(x, sigma), device, repeats)
    student.fast_path(precision, channels_last=channels_last, compile=compile_)
    rows["energy_and_score"] = _time(lambda: student.energy_and_score(x, sigma), device, repeats)

    # training steps: teacher DSM (first order) vs the student's loss on grad_x E (double backward)
    t_train = teacher.train().requires_grad_(True)  # loaded teachers are frozen
    opt_t = torch.optim.Adam(t_train.parameters(), lr=1e-6)

    def dsm_step():
        opt_t.zero_grad(set_to_none=True)
        loss = (t_train(x + sigma[:, None, None, None] * torch.randn_like(x), sigma) - x).pow(2).mean()
        loss.backward()
        opt_t.step()

    rows["teacher_dsm_step"] = _time(dsm_step, device, repeats)
    s_train = student.train()
    opt_s = torch.optim.Adam(s_train.parameters(), lr=1e-6)

    def distill_step():
        opt_s.zero_grad(set_to_none=True)
        d = s_train(x, sigma, create_graph=True)
        (d - x).pow(2).mean().backward()
        opt_s.step()

    rows["distill_step"] = _time(distill_step, device, repeats)
    student.eval()

    levels = 3
    smc_rows = {}
    for n in particles:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = _time(lambda: smc.sample(student, n, shape=(3, 32, 32), num_levels=levels, sigma_max=80.0,
                                         sigma_min=0.01, generator=torch.Generator(device=device).manual_seed(0),
                                         device=device, max_batch=min(n, 256)), device, max(1, repeats // 2))
        smc_rows[n] = {"particle_steps_per_s": n * levels / t,
                       "peak_memory_GiB": (torch.cuda.max_memory_allocated(device) / 2**30
                                           if device.type == "cuda" else None)}
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return {"machine": machine, "torch": torch.__version__, "parameters": n_params, "batch": batch,
            "precision": precision or "fp32", "channels_last": channels_last, "compile": compile_,
            "seconds": rows, "ratios": {"energy_and_score / teacher_forward":
                                        rows["energy_and_score"] / rows["teacher_forward"],
                                        "distill_step / teacher_dsm_step":
                                        rows["distill_step"] / rows["teacher_dsm_step"]},
            "images_per_s_distill": batch / rows["distill_step"], "smc": smc_rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--particles", type=int, nargs="+", default=None, help="default: 8 on CPU, 256 1024 on a GPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the student (default on a GPU)")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    particles = a.particles or ([256, 1024] if gpu else [8])
    precision = "bf16" if (a.bf16 or gpu) else None
    res = run(device, a.batch, particles, a.repeats, precision, gpu, a.compile)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cifar10_fast_path_{device.type}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"| {res['machine']} | {res['precision']} | batch {a.batch} | seconds |\n|---|---|---|---|")
    for k, v in res["seconds"].items():
        print(f"| {k} | | | {v:.3f} |")
    for k, v in res["ratios"].items():
        print(f"| {k} | | | {v:.2f}x |")
    for n, r in res["smc"].items():
        mem = "" if r["peak_memory_GiB"] is None else f", peak {r['peak_memory_GiB']:.2f} GiB"
        print(f"| SMC N={n} | | | {r['particle_steps_per_s']:.1f} particle-steps/s{mem} |")
    print(f"written {out}")


if __name__ == "__main__":
    main()
