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
  smc                  SMC of N particles (`--levels` levels, no MCMC), each N in a fresh process: particle-steps/s
                       and peak memory of the timed run (GPU: torch.cuda.max_memory_allocated; CPU: the process's
                       peak RSS, VmHWM reset just before the run, and its rise over the RSS before it)
  scaling              the same SMC sharded over 1 and 2 processes (`fkdiff.smc.distributed`, global resampling;
                       gloo on CPU, nccl on CUDA with >= 2 GPUs, one GPU a rank), N fixed: particle-steps/s

CPU always (fp32; bf16 autocast where asked); on a GPU also bf16 + channels_last (+ compile with --compile) and
N = 256 / 1024 particles. The machine is named in the output.

    python benchmarks/cifar10_fast_path.py [--device cuda] [--batch 8] [--particles 8] [--bf16] [--compile]
        [--scaling-particles 8] [--out benchmarks/results/cifar10_fast_path/cpu]
Writes <out>.json and <out>.md (a markdown table, also printed). Every GPU figure in one command:
benchmarks/gpu_all.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TIMES: dict[str, list[float]] = {}  # every repeat's seconds, by row (in the JSON: how noisy the machine was)


def _time(fn, device, repeats, name=None):
    fn()  # warm-up (compilation, allocator)
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    if name:
        TIMES[name] = out
    return statistics.median(out)


TINY = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8)  # --tiny: checks the script


def build(device):
    from diffusers import UNet2DModel

    from fkdiff.energy import student_from_teacher
    from teachers.adapters import from_diffusers
    from teachers.hub import DDPM_CIFAR10_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DModel(**{**DDPM_CIFAR10_UNET_CONFIG, **(TINY if os.environ.get("FKDIFF_BENCH_TINY") else {})})
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    teacher = from_diffusers(unet, alphas_cumprod=torch.cumprod(1 - betas, 0), prediction="eps").to(device)
    student = student_from_teacher(teacher).to(device)
    return teacher.eval(), student.eval(), sum(p.numel() for p in unet.parameters())


def _machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores visible), {torch.get_num_threads()} thread(s) a process"


def _status_gib(field):
    """VmRSS / VmHWM (peak RSS) of this process from /proc/self/status, in GiB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    raise KeyError(field)


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs), so the next peak is this run's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _in_child(args, device, precision, channels_last, compile_, levels):
    """Run this script with `args` in a fresh process (its own peak memory) and return the JSON it prints last."""
    cmd = [sys.executable, __file__, *args, "--device", str(device), "--levels", str(levels),
           "--threads", str(torch.get_num_threads())]
    cmd += (["--bf16"] if precision else []) + (["--channels-last"] if channels_last else [])
    cmd += ["--compile"] if compile_ else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _smc(student, n, device, levels, generator, population=None):
    from fkdiff import smc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smc.sample(student, n, shape=(3, 32, 32), num_levels=levels, sigma_max=80.0, sigma_min=0.01,
                          generator=generator, device=device, max_batch=min(n, 256), population=population)


def smc_child(n, device, levels, precision, channels_last, compile_):
    """One SMC run of n particles after a warm-up, in this fresh process: particle-steps/s and peak memory."""
    _, student, _ = build(device)
    student.fast_path(precision, channels_last=channels_last, compile=compile_)
    gen = torch.Generator(device=device)
    _smc(student, n, device, levels, gen.manual_seed(0))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = _status_gib("VmRSS")
        _reset_peak_rss()
    t0 = time.perf_counter()
    res = _smc(student, n, device, levels, gen.manual_seed(1))
    _sync(device)
    t = time.perf_counter() - t0
    out = {"particles": n, "levels": levels, "seconds": t, "particle_steps_per_s": n * levels / t,
           "finite": bool(torch.isfinite(res.samples).all())}
    if device.type == "cuda":
        out["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        out["peak_rss_GiB"] = _status_gib("VmHWM")  # the peak during the timed run (reset before it)
        out["peak_rss_rise_GiB"] = out["peak_rss_GiB"] - before  # over the RSS just before it (networks, allocator)
    return out


def _scaling_rank(rank, world, port, n, device_type, levels, precision, channels_last, compile_, threads, queue):
    import datetime

    import torch.distributed as dist

    from fkdiff.smc.distributed import ShardedPopulation

    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        _, student, _ = build(device)
        student.fast_path(precision, channels_last=channels_last, compile=compile_)
        gen = torch.Generator(device=device)
        _smc(student, n, device, levels, gen.manual_seed(0), ShardedPopulation())  # warm-up
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        res = _smc(student, n, device, levels, gen.manual_seed(1), ShardedPopulation())
        _sync(device)
        dist.barrier()
        t = time.perf_counter() - t0
        if rank == 0:
            queue.put({"processes": world, "backend": dist.get_backend(), "particles": n, "levels": levels,
                       "seconds": t, "particle_steps_per_s": n * levels / t, "log_Z": float(res.log_Z)})
    finally:
        dist.destroy_process_group()


def scaling_child(world, n, device, levels, precision, channels_last, compile_):
    """Sharded SMC of n particles over `world` processes (torch.multiprocessing), timed on rank 0."""
    import torch.multiprocessing as mp

    if device.type == "cuda" and torch.cuda.device_count() < world:
        return {"processes": world, "skipped": f"{torch.cuda.device_count()} GPU(s) here; nccl needs one a rank"}
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_scaling_rank, args=(world, port, n, device.type, levels, precision, channels_last, compile_,
                                  torch.get_num_threads(), queue), nprocs=world, join=True)
    return queue.get()


def run(device, batch, particles, repeats, precision, channels_last, compile_, levels=3, scaling_particles=None):
    from fkdiff.diffusion import checked_sigma

    load_before = os.getloadavg()[0]
    teacher, student, n_params = build(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen, device=device)
    sigma = checked_sigma(torch.full((batch,), 0.5, device=device))
    rows = {}
    with torch.no_grad():
        rows["teacher_forward"] = _time(lambda: teacher(x, sigma), device, repeats, "teacher_forward")
    student.fast_path(precision, channels_last=channels_last, compile=compile_)
    rows["energy_and_score"] = _time(lambda: student.energy_and_score(x, sigma), device, repeats, "energy_and_score")

    # training steps: teacher DSM (first order) vs the student's loss on grad_x E (double backward)
    t_train = teacher.train().requires_grad_(True)  # loaded teachers are frozen
    opt_t = torch.optim.Adam(t_train.parameters(), lr=1e-6)

    def dsm_step():
        opt_t.zero_grad(set_to_none=True)
        loss = (t_train(x + sigma[:, None, None, None] * torch.randn_like(x), sigma) - x).pow(2).mean()
        loss.backward()
        opt_t.step()

    rows["teacher_dsm_step"] = _time(dsm_step, device, repeats, "teacher_dsm_step")
    s_train = student.train()
    opt_s = torch.optim.Adam(s_train.parameters(), lr=1e-6)

    def distill_step():
        opt_s.zero_grad(set_to_none=True)
        d = s_train(x, sigma, create_graph=True)
        (d - x).pow(2).mean().backward()
        opt_s.step()

    rows["distill_step"] = _time(distill_step, device, repeats, "distill_step")
    student.eval()

    smc_rows = {n: _in_child(["--smc-child", str(n)], device, precision, channels_last, compile_, levels)
                for n in particles}
    scaling = {w: _in_child(["--scaling-child", str(w), str(scaling_particles)], device, precision, channels_last,
                            compile_, levels) for w in ((1, 2) if scaling_particles else ())}
    return {"machine": _machine(device), "command": " ".join(sys.argv), "tiny": bool(os.environ.get("FKDIFF_BENCH_TINY")), "torch": torch.__version__, "parameters": n_params, "batch": batch,
            "precision": precision or "fp32", "channels_last": channels_last, "compile": compile_,
            "load_average_1min": [load_before, os.getloadavg()[0]], "seconds": rows,
            "seconds_each_repeat": TIMES, "ratios": {"energy_and_score / teacher_forward":
                                        rows["energy_and_score"] / rows["teacher_forward"],
                                        "distill_step / teacher_dsm_step":
                                        rows["distill_step"] / rows["teacher_dsm_step"]},
            "images_per_s_distill": batch / rows["distill_step"], "smc": smc_rows, "scaling": scaling}


def table(res) -> str:
    """The markdown table of one run's JSON."""
    net = "a TINY UNet (--tiny: checks the script, not a figure)" if res.get("tiny") else "DDPM CIFAR-10 UNet"
    load = " -> ".join(f"{v:.1f}" for v in res.get("load_average_1min", []))
    lines = [f"Machine: {res['machine']}; torch {res['torch']}; {res['precision']}, channels_last "
             f"{res['channels_last']}, compile {res['compile']}; batch {res['batch']}; {net} "
             f"({res['parameters'] / 1e6:.1f}M parameters, random weights)."
             + (f" Load average (1 min) {load} over the run: other users' processes share the cores, so absolute "
                "times inflate; ratios are from the same run; seconds are medians (each repeat in the JSON)."
                if load else ""), "",
             "| measurement | value |", "|---|---|"]
    lines += [f"| {k} (s) | {v:.3f} |" for k, v in res["seconds"].items()]
    lines += [f"| {k} | {v:.2f}x |" for k, v in res["ratios"].items()]
    lines.append(f"| distillation images/s | {res['images_per_s_distill']:.2f} |")
    for n, r in res["smc"].items():
        mem = (f"peak {r['peak_memory_GiB']:.2f} GiB (allocated)" if "peak_memory_GiB" in r else
               f"peak RSS {r['peak_rss_GiB']:.2f} GiB during the run (+{r['peak_rss_rise_GiB']:.2f} GiB over the "
               "RSS before it)")
        lines.append(f"| SMC N={n}, {r['levels']} levels | {r['particle_steps_per_s']:.2f} particle-steps/s, {mem} |")
    for w, r in res["scaling"].items():
        lines.append(f"| sharded SMC, {w} process(es) | " + (r["skipped"] if "skipped" in r else
                     f"{r['particle_steps_per_s']:.2f} particle-steps/s (N={r['particles']}, {r['backend']}, "
                     f"{r['seconds']:.1f} s) |"))
    sc = res["scaling"]
    if all("particle_steps_per_s" in sc.get(w, {}) for w in (1, 2)):
        lines.append(f"| speed-up 1 -> 2 processes | {sc[2]['particle_steps_per_s'] / sc[1]['particle_steps_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--particles", type=int, nargs="+", default=None, help="default: 8 on CPU, 256 1024 on a GPU")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--scaling-particles", type=int, default=None,
                    help="N of the 1 -> 2 process scaling (default: the largest --particles; 0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the student (default on a GPU)")
    ap.add_argument("--channels-last", action="store_true", help="(default on a GPU)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None, help="<out>.json and <out>.md (default: "
                    "benchmarks/results/cifar10_fast_path/<device>[_compile])")
    ap.add_argument("--tiny", action="store_true", help="a small UNet of the same class: checks the script, its "
                    "figures mean nothing")
    ap.add_argument("--smc-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scaling-child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.tiny:
        os.environ["FKDIFF_BENCH_TINY"] = "1"  # the child processes build the same network
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    precision = "bf16" if (a.bf16 or gpu) else None
    channels_last = a.channels_last or gpu
    if a.smc_child is not None:
        print(json.dumps(smc_child(a.smc_child, device, a.levels, precision, channels_last, a.compile)))
        return
    if a.scaling_child is not None:
        print(json.dumps(scaling_child(*a.scaling_child, device, a.levels, precision, channels_last, a.compile)))
        return
    particles = a.particles or ([256, 1024] if gpu else [8])
    scaling_n = max(particles) if a.scaling_particles is None else a.scaling_particles
    res = run(device, a.batch, particles, a.repeats, precision, channels_last, a.compile, a.levels, scaling_n)
    out = Path(a.out) if a.out else RESULTS / "cifar10_fast_path" / (device.type + ("_compile" if a.compile else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    text = table(res)
    out.with_suffix(".md").write_text(text)
    print(text + f"written {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
