"""`python -m fkdiff.sample recipe=<name> [overrides]`: load models, compose them, run Feynman–Kac SMC, write results.

The `sample:` section of a recipe names the models and a composition expression, e.g.

    sample:
      models:
        ring:  {kind: analytic, preset: ring8}                 # exact analytic teacher
        strip: {kind: energy, path: runs/distill/.../strip.pt}  # a distilled student (fkdiff.load_energy)
      target: product(ring, strip)
      mcmc: {kind: hmc, num_steps: 1, num_leapfrog: 3}

Model kinds: `analytic` (teachers.presets, exact energies), `energy` (a distilled student file; `cond:` binds a
condition), `teacher` (a denoiser via teachers.load_teacher: a score field only, usable as `proposal`).
`sample.students=<distill run folder>` (or `latest`) swaps every analytic model for the student distilled from the
same preset, so `python -m fkdiff.distill && python -m fkdiff.sample sample.students=latest` composes the students.
The expression language is Python call syntax restricted to the model names, numbers, lists and the operators of
`fkdiff.compose` (product, mixture, negation, tempered, conditional; DESIGN.md section 6); nothing else evaluates.

Writes to the run folder: `config.yaml`, `samples.pt` (samples, log-weights, equally weighted resample),
`diagnostics.json` (log Z with its standard error, min ESS, unique ancestors, acceptance per level, ...),
`samples.png` (2D: weighted particles over the target density exp(-E(x, sigma_min)), beside naive reverse
diffusion; images: a grid) and `diagnostics.png` (ESS, unique ancestors and acceptance per level).

Many processes (GPUs, nodes): launched with WORLD_SIZE > 1 in the environment (torchrun sets it), the CLI initialises
the process group (nccl with cuda:LOCAL_RANK when `sample.device` is cuda, gloo on CPU), shards the N particles over
the ranks with `fkdiff.smc.distributed.sample` (global resampling; `sample.island=true` for island resampling) and
writes the files on rank 0 only (with all N samples):

    torchrun --standalone --nproc_per_node=8 -m fkdiff.sample recipe=toy2d sample.device=cuda   # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=job1 \
        -m fkdiff.sample recipe=toy2d sample.device=cuda                                   # run on each node
    srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 --rdzv_id=$SLURM_JOB_ID \
        -m fkdiff.sample recipe=toy2d sample.device=cuda                                   # SLURM
"""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from fkdiff import compose as C

__all__ = ["run", "load_model", "use_students", "parse_expression", "build_mcmc", "Conditioned"]

OPERATORS = {
    "product": C.product,
    "mixture": C.mixture,
    "negation": C.negation,
    "tempered": C.tempered,
    "conditional": C.conditional,
}


class Conditioned:
    """A conditional energy model with its condition bound: energy(x, sigma) = E(x, sigma, cond) for every sample."""

    def __init__(self, model: Any, cond: Any):
        self.model = model
        self.cond = cond
        for attr in ("sigma_min", "sigma_max", "sigma_data"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def _cond(self, x: torch.Tensor):
        c = torch.as_tensor(self.cond, device=x.device)
        if c.ndim == 0:  # a class label
            return c.long().expand(x.shape[0])
        return c.to(x.dtype).reshape(1, -1).expand(x.shape[0], -1)  # a position / condition vector

    def energy(self, x, sigma):
        return self.model.energy(x, sigma, cond=self._cond(x))

    def score(self, x, sigma):
        return self.model.score(x, sigma, cond=self._cond(x))

    def energy_and_grad(self, x, sigma):
        return self.model.energy_and_grad(x, sigma, cond=self._cond(x))

    def __call__(self, x, sigma, cond=None):
        return self.model(x, sigma, cond=self._cond(x) if cond is None else cond)


def load_model(spec: Mapping[str, Any], device: str | torch.device = "cpu") -> Any:
    """One model from its `sample.models.<name>` entry (see module docstring)."""
    spec = dict(spec)
    kind = spec.get("kind", "energy")
    if kind == "analytic":
        from teachers.presets import make_preset

        if not spec.get("preset"):
            raise ValueError("an analytic model needs `preset:` (one of teachers.presets.PRESETS)")
        model = make_preset(spec["preset"], **dict(spec.get("preset_kwargs") or {}), device=device)
    elif kind == "energy":
        from fkdiff import load_energy

        if not spec.get("path"):
            raise ValueError("an energy model needs `path:` to a distilled student (written by python -m fkdiff.distill)")
        model = load_energy(spec["path"], device=device)
    elif kind == "teacher":
        from teachers import load_teacher

        model = load_teacher(spec.get("teacher", spec), device=device)
    else:
        raise ValueError(f"unknown model kind {kind!r}; use analytic, energy or teacher")
    if spec.get("cond") is not None:
        model = Conditioned(model, spec["cond"])
    return model


def use_students(models: Mapping[str, Any], students: str, runs_root: str | Path = "runs/distill") -> dict:
    """Replace every analytic model by the student distilled from the same preset in a `fkdiff.distill` run.

    `students` is that run's folder, or `latest` for the newest folder under `runs_root` holding all the students
    needed. A distill run stores the student of preset P as `<run>/<P>/student.pt`.
    """
    need = {name: spec["preset"] for name, spec in models.items() if spec.get("kind") == "analytic"}
    if students == "latest":
        root = Path(runs_root)
        runs = sorted((d for d in root.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
        found = [d for d in runs if all((d / p / "student.pt").is_file() for p in need.values())]
        if not found:
            raise FileNotFoundError(
                f"sample.students=latest: no run under {root.resolve()} holds students for "
                f"{sorted(set(need.values()))}; run `python -m fkdiff.distill` first or pass the run folder")
        run_dir = found[0]
    else:
        run_dir = Path(students)
    out = {}
    for name, spec in models.items():
        if name in need:
            path = run_dir / need[name] / "student.pt"
            if not path.is_file():
                raise FileNotFoundError(f"sample.students={students}: {path} does not exist (students there: "
                                        f"{sorted(p.parent.name for p in run_dir.glob('*/student.pt'))})")
            out[name] = {"kind": "energy", "path": str(path), "cond": spec.get("cond")}
        else:
            out[name] = dict(spec)
    return out


def parse_expression(expr: str, models: Mapping[str, Any]) -> Any:
    """Evaluate a composition expression such as `product(ring, tempered(strip, 2.0))` over `models`."""
    try:
        tree = ast.parse(str(expr), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse composition expression {expr!r}: {e.msg}") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Name):
            if node.id in models:
                return models[node.id]
            raise ValueError(f"unknown model {node.id!r} in {expr!r}; defined: {', '.join(sorted(models))}")
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in OPERATORS:
            return OPERATORS[node.func.id](*[ev(a) for a in node.args], **{k.arg: ev(k.value) for k in node.keywords})
        raise ValueError(
            f"unsupported syntax in {expr!r}: only model names, numbers, lists and "
            f"{', '.join(OPERATORS)} calls are allowed")

    return ev(tree)


def build_mcmc(spec: Mapping[str, Any] | None):
    """An MCMC kernel from `{kind: hmc|mala|ula|uhmc|none, ...kwargs}`."""
    if not spec:
        return None
    spec = dict(spec)
    kind = str(spec.pop("kind", "hmc")).lower()
    if kind in ("none", "null", ""):
        return None
    from fkdiff import mcmc

    import dataclasses

    kernels = {"hmc": mcmc.HMC, "mala": mcmc.MALA, "ula": mcmc.ULA, "uhmc": mcmc.UHMC}
    if kind not in kernels:
        raise ValueError(f"unknown mcmc kind {kind!r}; use one of {', '.join(kernels)} or none")
    cls = kernels[kind]
    known = {f.name for f in dataclasses.fields(cls) if f.name != "_"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} takes no {', '.join(unknown)} (it takes {', '.join(sorted(known))}); "
                         f"select the kernel with sample/mcmc={kind} rather than sample.mcmc.kind={kind}")
    return cls(**{k: v for k, v in spec.items() if v is not None})


def _potentials(s: Mapping[str, Any]) -> list:
    from fkdiff import smc

    pots = []
    if s.get("bounds"):
        b = s["bounds"]
        pots.append(smc.Box(b["low"], b["high"]))
    if s.get("temperature") not in (None, 1, 1.0):
        if s.get("mode", "sampler") != "twisted":
            raise ValueError("sample.temperature (low-temperature tilt) needs sample.mode=twisted; "
                             "in sampler mode use the expression tempered(model, beta) instead")
        pots.append(smc.LowTemperature(float(s["temperature"])))
    return pots


def run(cfg: DictConfig) -> dict:
    """Sample as configured by `cfg.sample`; returns the diagnostics dict (also written to the run folder)."""
    from fkdiff import smc

    s = OmegaConf.to_container(cfg.sample, resolve=True)
    device = torch.device(s.get("device") or "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    owns_group = False
    if world_size > 1:
        device, owns_group = _init_distributed(device)
    is_main = int(os.environ.get("RANK", "0")) == 0
    run_dir = Path(cfg.run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if not s.get("models"):
        raise ValueError("sample.models is empty: name at least one model (see `python -m fkdiff.sample --help`)")
    specs = use_students(s["models"], s.get("students")) if s.get("students") else s["models"]
    models = {name: load_model(spec, device) for name, spec in specs.items()}
    target = parse_expression(s["target"], models)
    proposal = parse_expression(s["proposal"], models) if s.get("proposal") else None
    shape = tuple(s.get("shape") or _infer_shape(models))
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    sampler, extra = smc.sample, {}
    if world_size > 1:
        sampler, extra = smc.distributed.sample, {"island": bool(s.get("island", False)), "gather": True}
    result = sampler(
        target, int(s["num_particles"]), shape=shape, num_steps=int(s["num_steps"]),
        sigma_max=float(s["sigma_max"]), sigma_min=float(s["sigma_min"]), proposal=proposal,
        potentials=_potentials(s), mcmc=build_mcmc(s.get("mcmc")), resample=s.get("resample", "systematic"),
        ess_threshold=float(s.get("ess_threshold", 0.5)), mode=s.get("mode", "sampler"),
        final_denoise=bool(s.get("final_denoise", True)), generator=gen, device=device,
        max_batch=s.get("max_batch"), progress=bool(s.get("progress", True)),
        init_std=s.get("init_std"), **extra,
    )
    island_log_z = getattr(result, "island_log_Z", None)
    if world_size > 1:
        result = result.full()  # all N samples (gathered on every rank); only rank 0 writes
        if owns_group:
            torch.distributed.destroy_process_group()
        if not is_main:
            return dict(result.summary(), world_size=world_size)
    equal = result.resample(gen)
    saved = {"samples": result.samples.cpu(), "log_weights": result.log_weights.cpu(), "resampled": equal.cpu()}
    diag = dict(result.summary())
    diag.update(target=s["target"], num_particles=int(s["num_particles"]), num_steps=int(s["num_steps"]),
                ess=result.ess.tolist(), unique_ancestors=result.unique_ancestors.tolist(),
                resampled=result.resampled.tolist(), num_invalid=result.num_invalid.tolist(),
                acceptance=None if result.acceptance is None else result.acceptance.tolist(),
                step_size=None if result.step_size is None else result.step_size.tolist(),
                sigmas=None if result.sigmas is None else result.sigmas.tolist(), warnings=list(result.warnings),
                world_size=world_size)
    if island_log_z is not None:
        diag["island_log_Z"] = island_log_z.tolist()
    baseline = None
    if s.get("compare_reverse_diffusion", True) and len(shape) == 1 and shape[0] == 2:
        from fkdiff.samplers import reverse_diffusion

        baseline = reverse_diffusion(target, int(s["num_particles"]), shape=shape, num_steps=int(s["num_steps"]),
                                     sigma_max=float(s["sigma_max"]), sigma_min=float(s["sigma_min"]),
                                     generator=torch.Generator(device=device).manual_seed(int(cfg.seed) + 1),
                                     device=device, max_batch=s.get("max_batch")).samples
        saved["reverse_diffusion"] = baseline.cpu()
    torch.save(saved, run_dir / "samples.pt")
    (run_dir / "diagnostics.json").write_text(json.dumps(_jsonable(diag), indent=2))
    if s.get("plot", {}).get("enabled", True):
        _plot(result, equal, baseline, target, s, run_dir)
    print(f"[fkdiff.sample] {s['target']}: log Z = {result.log_Z:.4f} +- {result.log_Z_se:.4f}, "
          f"min ESS = {result.min_ess:.1f}/{result.num_particles}, results in {run_dir}")
    return diag


def _init_distributed(device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group torchrun / srun describe in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): nccl on this rank's GPU cuda:LOCAL_RANK when `device` is CUDA, gloo otherwise.
    Returns (this rank's device, whether this call created the group)."""
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def _infer_shape(models: Mapping[str, Any]) -> tuple:
    for m in models.values():
        inner = getattr(m, "model", m)
        for attr in ("event_shape", "shape"):
            if hasattr(inner, attr) and getattr(inner, attr) is not None:
                return tuple(getattr(inner, attr))
        if hasattr(inner, "dim"):
            return (int(inner.dim),)
    raise ValueError("cannot infer the sample shape from the models; set sample.shape (e.g. [2] or [3, 16, 16])")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _plot(result, equal, baseline, target, s, run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = equal.detach().cpu().float()
    if x.ndim == 2 and x.shape[1] == 2:
        lim = float(s.get("plot", {}).get("lim", 1.5))
        n = 200
        g = torch.linspace(-lim, lim, n, dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        pts = torch.stack([xx.flatten(), yy.flatten()], 1)
        from fkdiff import targets

        e = targets.energy(target, pts, float(s["sigma_min"]), max_batch=s.get("max_batch"))
        dens = torch.softmax(-e.double(), 0).reshape(n, n)
        panels = [("target exp(-E) at sigma_min", None), ("SMC (this run)", x)]
        if baseline is not None:
            panels.append(("naive reverse diffusion", baseline.detach().cpu().float()))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
        for ax, (title, pts_) in zip(axes, panels):
            ax.imshow(dens.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="Blues")
            if pts_ is not None:
                ax.scatter(pts_[:, 0], pts_[:, 1], s=2, c="tab:orange", alpha=0.6)
            ax.set_title(title)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
        fig.suptitle(f"{s['target']}  (log Z = {result.log_Z:.3f} ± {result.log_Z_se:.3f})")
    elif x.ndim == 4:
        k = min(64, x.shape[0])
        side = int(math.ceil(math.sqrt(k)))
        fig, axes = plt.subplots(side, side, figsize=(side, side))
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < k:
                img = ((x[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).numpy()
                ax.imshow(img, cmap="gray" if x.shape[1] == 1 else None, vmin=0, vmax=1)
    else:
        fig = None
    if fig is not None:
        fig.tight_layout()
        fig.savefig(run_dir / "samples.png", dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    lev = range(len(result.ess))
    axes[0].plot(lev, result.ess.cpu().numpy())
    axes[0].set_title("ESS after weighting")
    axes[1].plot(lev, result.unique_ancestors.cpu().numpy())
    axes[1].set_title("unique ancestors")
    if result.acceptance is not None:
        axes[2].plot(lev, result.acceptance.cpu().numpy())
    axes[2].set_title("MCMC acceptance")
    for ax in axes:
        ax.set_xlabel("level (sigma_max -> sigma_min)")
    fig.tight_layout()
    fig.savefig(run_dir / "diagnostics.png", dpi=100)
    plt.close(fig)


def _main() -> None:
    from fkdiff.recipes import main

    main(run, task="sample")


if __name__ == "__main__":
    _main()
