"""`python -m fkdiff.sample recipe=<name> [overrides]`: load models, compose them, run Feynman–Kac SMC, write results.

The `sample:` section of a recipe names the models and a composition expression, e.g.

    sample:
      models:
        ring:  {kind: analytic, preset: ring8}                 # exact analytic teacher
        strip: {kind: energy, path: runs/distill/.../strip.pt}  # a distilled student (fkdiff.load_energy)
      target: product(ring, strip)
      num_levels: 100                                         # or budget: 1000 (evaluations per particle, planned)
      mcmc: {num_steps: 1, num_leapfrog: 3}                   # the kernel itself: sample/mcmc=hmc (a config group)

This module only wires library parts together:
- models from their specs: `fkdiff.models.load_model` (kinds `analytic`, `energy`, `teacher`; `cond:` binds a
  condition); `sample.students=<distill run folder>` (or `latest`) swaps every analytic model for the student
  distilled from the same preset (`fkdiff.models.use_students`), so `python -m fkdiff.distill && python -m
  fkdiff.sample sample.students=latest` composes the students;
- the expression: `fkdiff.compose.parse` (Python call syntax restricted to the model names, numbers, lists and
  product, mixture, negation, tempered, conditional; nothing else evaluates);
- potentials: `fkdiff.smc.potentials.build` for each entry of `sample.potentials` (`sample.bounds` and
  `sample.temperature` are shorthands for a `box` and a `low_temperature` entry with ramp 3);
- the rejuvenation kernel: `fkdiff.mcmc.build` of the config group `sample/mcmc` (hmc | mala | rwm | ula | uhmc |
  none; fkdiff/conf/sample/mcmc/*.yaml);
- the figures: `fkdiff.plotting`.

Writes to the run folder (each file atomically: a kill leaves no torn file), `config.yaml`, `samples.pt` (samples,
log-weights, equally weighted resample), then the figures, and last `diagnostics.json` (log Z with its standard error,
and every per-level diagnostic of `fkdiff.smc.COLLECTORS`): a folder without it is incomplete (an interrupted run),
whatever else it holds. The figures are
`samples.png` (2D: weighted particles over the target density exp(-E(x, sigma_min)), beside naive reverse
diffusion; images: a grid) and `diagnostics.png` (ESS, unique ancestors and acceptance per level). The naive
sampler's points are saved too (`samples.pt["reverse_diffusion"]`, 2D with `sample.compare_reverse_diffusion`).

Many processes (GPUs, nodes): launched with WORLD_SIZE > 1 in the environment (torchrun sets it), the CLI initialises
the process group (nccl with cuda:LOCAL_RANK when `sample.device` is cuda, gloo on CPU), shards the N particles over
the ranks (`fkdiff.smc.sample` with a `fkdiff.smc.distributed.ShardedPopulation`: global resampling;
`sample.island=true` for island resampling) and
writes the files on rank 0 only (with all N samples):

    torchrun --standalone --nproc_per_node=8 -m fkdiff.sample recipe=toy2d sample.device=cuda   # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=job1 \
        -m fkdiff.sample recipe=toy2d sample.device=cuda                                   # run on each node
    srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 --rdzv_id=$SLURM_JOB_ID \
        -m fkdiff.sample recipe=toy2d sample.device=cuda                                   # SLURM
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fkdiff import compose, mcmc, plotting, samplers, smc
from fkdiff.compose import Conditioned  # noqa: F401  (re-exported: the earlier home of these names)
from fkdiff.compose import parse as parse_expression
from fkdiff.files import atomic_torch_save, atomic_write_text
from fkdiff.mcmc import build as build_mcmc
from fkdiff.models import infer_shape, load_model, use_students
from fkdiff.smc import potentials as P

__all__ = ["run", "load_model", "use_students", "parse_expression", "build_mcmc", "Conditioned", "DONE"]

DONE = "diagnostics.json"  # written last: a run folder without it is incomplete


def _potential_specs(opt: dict) -> dict:
    """`sample.potentials` plus the shorthands `sample.bounds` (a box) and `sample.temperature` (a low-temperature
    tilt, twisted mode only)."""
    specs = dict(opt.get("potentials") or {})
    if opt.get("bounds"):
        specs["bounds"] = {"kind": "box", **opt["bounds"]}
    if opt.get("temperature") not in (None, 1, 1.0):
        if opt.get("mode", "sampler") != "twisted":
            raise ValueError("sample.temperature (low-temperature tilt) needs sample.mode=twisted; "
                             "in sampler mode use the expression tempered(model, beta) instead")
        # ramp 3: tilt once the modes have separated (a linear ramp can empty the lighter / narrower mode; README
        # "Low temperature"); more MCMC steps per level were measured not to help
        specs["temperature"] = {"kind": "low_temperature", "beta": float(opt["temperature"]),
                                "ramp": float(smc.adaptive.DEFAULTS["low_temperature_ramp"])}
    return specs


def _kernel(opt: dict, target) -> "mcmc.Kernel | None":
    """The rejuvenation kernel of `sample/mcmc`; with `sample.budget` and HMC's num_steps left null, the budget plan's
    HMC steps per level (fkdiff.smc.adaptive.default_mcmc_steps: 1)."""
    spec = dict(opt.get("mcmc") or {})
    if opt.get("budget") is not None and spec.get("kind", "hmc") == "hmc" and spec.get("num_steps") is None:
        spec["num_steps"] = smc.adaptive.default_mcmc_steps(target) if opt.get("mode") is None else 1
    return mcmc.build(spec)


def _num_levels(opt: dict) -> int:
    """sample.num_levels, or its deprecated former name sample.num_steps when that is given."""
    if opt.get("num_steps") is None:
        return int(opt["num_levels"])
    warnings.warn("sample.num_steps is deprecated for the number of SMC levels: use sample.num_levels "
                  "(sample.mcmc.num_steps counts MCMC steps per level)", DeprecationWarning, stacklevel=2)
    return int(opt["num_steps"])


def run(cfg: DictConfig) -> dict:
    """Sample as configured by `cfg.sample`; returns the diagnostics dict (also written to the run folder)."""
    opt = OmegaConf.to_container(cfg.sample, resolve=True)
    device = torch.device(opt.get("device") or "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    owns_group = False
    if world_size > 1:
        device, owns_group = _init_distributed(device, cfg.get("timeout"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    run_dir = Path(cfg.run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DONE).unlink(missing_ok=True)  # written last: its absence marks the folder incomplete
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if not opt.get("models"):
        raise ValueError("sample.models is empty: name at least one model (see `python -m fkdiff.sample --help`)")
    specs = use_students(opt["models"], opt.get("students")) if opt.get("students") else opt["models"]
    models = {name: load_model(spec, device) for name, spec in specs.items()}
    target = compose.parse(opt["target"], models)
    proposal = compose.parse(opt["proposal"], models) if opt.get("proposal") else None
    shape = tuple(opt.get("shape") or infer_shape(models))
    budget = opt.get("budget")
    num_levels = None if budget is not None else _num_levels(opt)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    population = smc.distributed.ShardedPopulation(island=bool(opt["island"])) if world_size > 1 else None
    result = smc.sample(
        target, opt["num_particles"], shape=shape, num_levels=num_levels, sigma_max=float(opt["sigma_max"]),
        sigma_min=float(opt["sigma_min"]), proposal=proposal, mode=opt["mode"],
        potentials=[P.build(spec) for spec in _potential_specs(opt).values()], mcmc=_kernel(opt, target),
        budget=None if budget is None else float(budget),
        resample=opt["resample"], ess_threshold=float(opt["ess_threshold"]), final_denoise=bool(opt["final_denoise"]),
        init_std=opt.get("init_std"), generator=gen, device=device, max_batch=opt.get("max_batch"),
        progress=bool(opt["progress"]), population=population)
    island_log_z = getattr(result, "island_log_Z", None)
    if world_size > 1:
        result = result.full()  # all N samples (gathered on every rank); only rank 0 writes
        if owns_group:
            torch.distributed.destroy_process_group()
        if not is_main:
            return dict(result.summary(), world_size=world_size)
    equal = result.resample(gen)
    saved = {"samples": result.samples.cpu(), "log_weights": result.log_weights.cpu(), "resampled": equal.cpu()}
    num_levels = len(result.sigmas) if num_levels is None else num_levels
    diag = dict(result.summary(), target=opt["target"], num_particles=int(opt["num_particles"]), num_levels=num_levels,
                **{k: None if v is None else v.tolist() for k, v in result.levels.items()},
                sigmas=None if result.sigmas is None else result.sigmas.tolist(), warnings=list(result.warnings),
                world_size=world_size)
    if island_log_z is not None:
        diag["island_log_Z"] = island_log_z.tolist()
    if getattr(result, "plan", None) is not None:
        diag["plan"] = result.plan
    baseline = None
    baseline_name = "naive reverse diffusion"
    if opt["compare_reverse_diffusion"] and (shape == (2,) or len(shape) == 3):
        # the naive summed-score sampler: 2D on the same levels; images with as many levels as SMC made target
        # evaluations per particle (equal evaluations: SMC + MCMC costs several per level)
        rd_levels = num_levels if shape == (2,) else max(2, int(round(result.nfe)))
        baseline = samplers.reverse_diffusion(
            target, int(opt["num_particles"]), shape=shape, num_levels=rd_levels, sigma_max=float(opt["sigma_max"]),
            sigma_min=float(opt["sigma_min"]), device=device, max_batch=opt.get("max_batch"),
            init_std=opt.get("init_std"), generator=torch.Generator(device=device).manual_seed(int(cfg.seed) + 1))
        saved["reverse_diffusion"] = baseline.samples.cpu()
        diag["reverse_diffusion_levels"] = rd_levels
        if len(shape) == 3:
            baseline_name = f"naive reverse diffusion ({rd_levels} levels, equal evaluations)"
    atomic_torch_save(saved, run_dir / "samples.pt")
    if opt["plot"]["enabled"]:
        beta = float(opt.get("temperature") or 1.0)  # sample.temperature tilts the final law to p^beta: show that
        shown, tilt = (target, "") if beta == 1.0 else (compose.tempered(target, beta), f" ^ {beta:g}")
        fig = plotting.samples_figure(shown, equal, sigma=float(opt["sigma_min"]), lim=float(opt["plot"]["lim"]),
                                      others=None if baseline is None else {baseline_name: baseline.samples},
                                      title=f"{opt['target']}{tilt}{_conditions(specs, opt['target'])}\n"
                                            f"{result.report()}",
                                      max_batch=opt.get("max_batch"))
        if fig is not None:
            plotting.save(fig, run_dir / "samples.png")
        plotting.save(plotting.diagnostics_figure(result), run_dir / "diagnostics.png")
    atomic_write_text(run_dir / DONE, json.dumps(_jsonable(diag), indent=2))  # last: the folder is complete
    print(f"[fkdiff.sample] {opt['target']}: {result.report()}, results in {run_dir}")
    return diag


def _conditions(specs: dict, expr: str) -> str:
    """'  [name: cond ...]' for the models of the expression `expr` with a bound condition (the figure title),
    else ''."""
    used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(expr)))
    conds = [f"{name}: {spec['cond']}" for name, spec in specs.items()
             if spec.get("cond") is not None and name in used]
    return f"  [{', '.join(conds)}]" if conds else ""


def _init_distributed(device: torch.device, timeout: float | None = None) -> tuple[torch.device, bool]:
    """Join the process group torchrun / srun describe in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): nccl on this rank's GPU cuda:LOCAL_RANK when `device` is CUDA, gloo otherwise. `timeout` (seconds,
    the config's `timeout`): how long a collective waits for the other ranks before failing.
    Returns (this rank's device, whether this call created the group)."""
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    from datetime import timedelta

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=None if timeout is None else timedelta(seconds=float(timeout)))
    return device, True


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _main() -> None:
    from fkdiff.recipes import main

    main(run, task="sample")


if __name__ == "__main__":
    _main()
