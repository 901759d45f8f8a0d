"""Energy students: conservative denoisers D_theta(x, sigma) = x - sigma^2 grad_x E_theta(x, sigma) (DESIGN.md section 3).

Energy preconditioning (mirrors EDM's c_skip / c_out / c_in; Karras et al. 2022 table 1), with sd = sigma_data:

    c_in = 1/sqrt(sigma^2+sd^2),   c_out = sigma sd/sqrt(sigma^2+sd^2),   c_skip = sd^2/(sigma^2+sd^2)
    E_theta(x, sigma) = |x|^2 / (2 (sigma^2 + sd^2)) + (sd / sigma) * g_theta(c_in x, c_noise(sigma))

so that D_theta = c_skip x - c_out grad_u g_theta(u) at u = c_in x: the Gaussian term is EDM's skip connection and
-grad_u g plays the role of EDM's network output F. With g = 0 the student is exactly the optimal denoiser of
N(0, sd^2 I), D = c_skip x, at every sigma.

Scalar heads g over an x-shaped network f_theta(u, c_noise, cond) (Du et al. 2023 appendix E; Salimans & Ho 2021):
    l2      g = 1/2 |f(u)|^2                       (bounded below: E cannot run off to -inf)
    ip      g = -<u, f(u)>                          (inner product)
    dae     g = 1/2 |u - f(u)|^2 - 1/2 |u|^2        (Salimans & Ho's DAE energy; its |u|^2/2 is the Gaussian term)
    scalar  g = <w, pool(f(u))>                     (a scalar head on the backbone: spatial sum per channel, linear)
`l2` is quadratic in f, so a zero-initialised output layer would be a saddle with zero gradient: its output layer
starts small instead (`l2_init_scale`). The others start at g = 0 exactly.

A student over a copy of its teacher's network (`student_from_teacher`, warm-started as in Thornton et al. 2025) uses
EDM's network output of *any* denoiser, F(u, c_noise, cond) = (D(x, sigma, cond) - c_skip x) / c_out at x = u / c_in,
sigma = exp(4 c_noise) (`DenoiserNet`), initialised with the teacher's weights. A conservative F is the gradient of
phi(u) = phi(0) + int_0^1 <u, F(t u)> dt; the midpoint rule of that integral gives the `ip` head with f(u) = F(u / 2):

    g(u) = -<u, F(u/2)>,   D_theta = c_skip x + c_out (F(u/2) + J_F(u/2)^T u / 2)

which equals the teacher wherever F is affine with a symmetric Jacobian (every teacher at large sigma, any Gaussian
data at every sigma) and costs one forward and one backward of the teacher's network. Measured on the 2D ring of 8
Gaussians (tests/test_warm_student.py): initial projection loss 0.034 against 0.41 for a fresh student (g = 0) and 1.4
for f = F / 2 at u. With `l2` (f = F) only the features start at the teacher's (D_theta = c_skip x - c_out J_F^T F):
its initial loss is higher than a fresh student's on the ring (2.8), so `ip` is the warm start to use.

Fast path (`EnergyStudent.fast_path`): the network f runs under `torch.autocast` (bf16) with its output cast back to
float32 before g's reductions, so energies, scores and everything downstream (SMC weights, log Z: float64) accumulate in
full precision; `channels_last` feeds convolutional nets NHWC tensors; `compile` runs `torch.compile` on f for
graph-free evaluations (sampling; training's double backward keeps the eager network).

The score -grad_x E is an autograd gradient of a scalar (conservative: its Jacobian is the symmetric -Hessian of E).
The graph of that gradient is kept (create_graph) only when the module is training and grad mode is on, which is
what distillation needs (the loss differentiates the score w.r.t. theta); sampling gets detached outputs.
The student satisfies the `Denoiser` and `EnergyModel` protocols (fkdiff.protocols), so anything that takes a
teacher takes a student.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fkdiff.diffusion import SIGMA_MAX, SIGMA_MIN, append_dims, as_sigma, check_batch, checked_sigma, edm_precond
from fkdiff.nets import build_backbone

__all__ = ["G_KINDS", "FORMAT", "PRECISIONS", "EnergyStudent", "DenoiserNet", "build_student", "student_from_teacher",
           "warm_start_from", "save_student", "load_energy"]

PRECISIONS = {"fp32": None, "32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

G_KINDS = ("l2", "ip", "dae", "scalar")
FORMAT = "fkdiff.energy/1"


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product over event dims. `[B, *event] x [B, *event] -> [B]`."""
    return (a * b).flatten(1).sum(1)


class EnergyStudent(nn.Module):
    """E_theta(x, sigma, cond) with the energy preconditioning of DESIGN.md section 3.

    Args:
        backbone: x-shaped network `f(u [B, *event], c_noise [B], cond) -> [B, *event]` (fkdiff.nets).
        event_shape: shape of one sample, e.g. `(2,)` or `(3, 16, 16)`.
        sigma_data: sd in the preconditioning (the data's per-coordinate standard deviation).
        g: one of `G_KINDS`.
        config: the keyword arguments of `build_student` that rebuilt this student (stored in checkpoints).
    """

    def __init__(self, backbone: nn.Module, event_shape, sigma_data: float, g: str = "l2", *,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, l2_init_scale: float = 0.1,
                 config: Mapping[str, Any] | None = None):
        super().__init__()
        if g not in G_KINDS:
            raise ValueError(f"unknown energy head g={g!r}; choose one of {', '.join(G_KINDS)}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.f = backbone
        self.event_shape = tuple(int(s) for s in event_shape)
        self.sigma_data, self.g_kind = float(sigma_data), g
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.config = dict(config) if config is not None else None
        if g == "scalar":
            channels = self.event_shape[0]  # d for vectors, C for images
            self.head = nn.Linear(channels, 1, bias=False)
            nn.init.constant_(self.head.weight, 1.0 / math.sqrt(channels))
        if g == "l2":
            out = _output_layer(backbone)
            if out is not None and not out.weight.abs().sum() > 0:
                # a zero output layer is a saddle of any loss of grad(1/2|f|^2): start small, not at zero
                nn.init.normal_(out.weight, std=l2_init_scale / math.sqrt(out.weight[0].numel()))
        self.autocast_dtype: torch.dtype | None = None
        self.channels_last = False
        self._compiled_f = None  # kept outside the module tree (state_dict keys stay those of f)

    # -- fast path (module docstring) ---------------------------------------------------------
    def fast_path(self, precision: str | torch.dtype | None = None, channels_last: bool = False,
                  compile: bool = False, **compile_kwargs: Any) -> "EnergyStudent":
        """Set how f runs: `precision` "bf16" (autocast; "fp16" too) or "fp32"/None, `channels_last` for conv nets,
        `compile` with `torch.compile(f, **compile_kwargs)` for evaluations without a graph. Returns self."""
        if isinstance(precision, str):
            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
            precision = PRECISIONS[precision]
        self.autocast_dtype = precision
        self.channels_last = bool(channels_last) and len(self.event_shape) == 3
        if self.channels_last:
            self.f.to(memory_format=torch.channels_last)
        self._compiled_f = torch.compile(self.f, **compile_kwargs) if compile else None
        return self

    def _net(self, u: Tensor, c_noise: Tensor, cond: Any) -> Tensor:
        """f(u, c_noise, cond) in float32 (or u's dtype), through the fast path's autocast / layout / compiled f."""
        if self.channels_last:
            u = u.contiguous(memory_format=torch.channels_last)
        # the compiled f has no double backward: used where no graph of the score is kept (sampling)
        net = self._compiled_f if self._compiled_f is not None and not self._keep_graph else self.f
        with contextlib.ExitStack() as stack:
            if self._keep_graph:  # fused attention kernels (flash / memory-efficient) have no double backward
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(u.device.type, dtype=self.autocast_dtype))
            f = net(u, c_noise, cond)
        return f.to(u.dtype)

    _keep_graph = False

    # -- the scalar g_theta(u) ----------------------------------------------------------------
    def g(self, u: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        """g_theta(u, c_noise, cond). `u [B, *event] -> [B]`."""
        f = self._net(u, c_noise, cond)
        if self.g_kind == "l2":
            return 0.5 * f.flatten(1).pow(2).sum(1)
        if self.g_kind == "ip":
            return -_dot(u, f)
        if self.g_kind == "dae":
            return 0.5 * f.flatten(1).pow(2).sum(1) - _dot(u, f)  # = 1/2|u - f|^2 - 1/2|u|^2
        pooled = f.flatten(2).sum(2) if f.ndim > 2 else f  # [B, C]: spatial sum per channel
        return self.head(pooled)[:, 0]

    # -- energy, score, denoiser -----------------------------------------------------------------
    def _cast(self, x: Tensor) -> Tensor:
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def energy(self, x: Tensor, sigma: float | Tensor, cond: Any = None) -> Tensor:
        """E_theta(x, sigma) `[B]` for x `[B, *event]` (p_sigma ∝ exp(-E)); sigma a float or `[B]`."""
        check_batch(x, len(self.event_shape))
        xd = self._cast(x)
        s = as_sigma(sigma, xd)
        sd = self.sigma_data
        pc = edm_precond(s, sd)
        gauss = 0.5 * xd.flatten(1).pow(2).sum(1) / (s**2 + sd**2)
        e = gauss + (sd / s) * self.g(append_dims(pc.c_in, xd.ndim) * xd, pc.c_noise, cond)
        return e.to(x.dtype)

    def energy_and_grad(self, x: Tensor, sigma: float | Tensor, cond: Any = None,
                        create_graph: bool | None = None) -> tuple[Tensor, Tensor]:
        """(E `[B]`, grad_x E `[B, *event]`). Graph kept iff `create_graph` (default: training and grad enabled)."""
        if create_graph is None:
            create_graph = self.training and torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if (x.requires_grad and create_graph) else x.detach().requires_grad_(True)
            self._keep_graph = create_graph
            try:
                e = self.energy(xg, sigma, cond)
            finally:
                self._keep_graph = False
            (grad,) = torch.autograd.grad(e.sum(), xg, create_graph=create_graph)
        if not create_graph:
            e, grad = e.detach(), grad.detach()
        return e, grad

    def energy_and_score(self, x: Tensor, sigma: float | Tensor, cond: Any = None,
                         create_graph: bool | None = None) -> tuple[Tensor, Tensor]:
        """(E `[B]`, -grad_x E `[B, *event]`) from one forward and one backward pass."""
        e, grad = self.energy_and_grad(x, sigma, cond, create_graph)
        return e, -grad

    def score(self, x: Tensor, sigma: float | Tensor, cond: Any = None, create_graph: bool | None = None) -> Tensor:
        """-grad_x E_theta(x, sigma). `[B, *event]`."""
        return -self.energy_and_grad(x, sigma, cond, create_graph)[1]

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Any = None, create_graph: bool | None = None) -> Tensor:
        """Denoiser D_theta(x, sigma) = x - sigma^2 grad_x E = c_skip x - c_out grad_u g. `[B, *event]`."""
        _, grad = self.energy_and_grad(x, sigma, cond, create_graph)
        s = append_dims(as_sigma(sigma, grad), grad.ndim)
        return x - s**2 * grad

    # -- what the student is conditioned on -------------------------------------------------------
    @property
    def cond_kind(self) -> str:
        """"none" | "class" | "position": the condition `cond` this student takes (its network's, or its teacher's
        for a student over a copy of a teacher's network)."""
        return str(getattr(self.f, "cond_kind", None) or getattr(getattr(self.f, "cond_emb", None), "kind", "none"))

    @property
    def num_classes(self) -> int | None:
        """The number of classes K of a class-conditional student (labels in [0, K)); None otherwise."""
        if self.cond_kind != "class":
            return None
        return getattr(self.f, "num_classes", None) or getattr(getattr(self.f, "cond_emb", None), "num_classes", None)

    def extra_repr(self) -> str:
        return f"g={self.g_kind}, event_shape={self.event_shape}, sigma_data={self.sigma_data:.4g}"


class DenoiserNet(nn.Module):
    """EDM's network output of a denoiser as an x-shaped net `f(u [B, *event], c_noise [B], cond) -> [B, *event]`:

        sigma = exp(4 c_noise),   x = input_scale u / c_in(sigma),   f = scale * (D(x, sigma, cond) - c_skip x) / c_out

    (the inverse of EDM's preconditioning, Karras et al. 2022 eq. 7), so that an `EnergyStudent` over a copy of a
    teacher's denoiser starts from the teacher's weights (module docstring). `cond` is passed on only when given.
    """

    def __init__(self, denoiser: nn.Module, sigma_data: float, scale: float = 1.0, input_scale: float = 1.0):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_data, self.scale, self.input_scale = float(sigma_data), float(scale), float(input_scale)

    @property
    def cond_kind(self) -> str | None:
        return getattr(self.denoiser, "cond_kind", None)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.denoiser, "num_classes", None)

    def forward(self, u: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        sigma = checked_sigma((4 * c_noise).exp())  # c_noise = log(sigma) / 4 of a sigma checked where it entered
        pc = edm_precond(sigma, self.sigma_data)
        c_skip, c_out, c_in = (append_dims(c, u.ndim) for c in (pc.c_skip, pc.c_out, pc.c_in))
        x = (self.input_scale * u) / c_in
        d = self.denoiser(x, sigma) if cond is None else self.denoiser(x, sigma, cond)
        return self.scale * (d.to(u.dtype) - c_skip * x) / c_out


# a student over a copy of its teacher: f(u) = scale * F_teacher(input_scale * u) (module docstring)
COPY_RULE = {"ip": (1.0, 0.5), "l2": (1.0, 1.0)}  # g -> (scale, input_scale): ip is the midpoint rule


def _output_layer(backbone: nn.Module) -> nn.Module | None:
    """The backbone's last linear/conv layer (fkdiff.nets zero-initialises it), or None if not found."""
    out = getattr(backbone, "out", None)
    if isinstance(out, nn.Sequential):
        out = out[-1]
    return out if isinstance(out, (nn.Linear, nn.Conv2d)) else None


def build_student(event_shape, sigma_data: float, g: str = "l2", *, backbone: Mapping[str, Any] | None = None,
                  cond_kind: str = "none", num_classes: int | None = None, cond_dim: int | None = None,
                  sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, l2_init_scale: float = 0.1,
                  network: Mapping[str, Any] | None = None, network_scale: float = 1.0,
                  network_input_scale: float = 1.0, teacher: Any = None) -> EnergyStudent:
    """An `EnergyStudent` over `fkdiff.nets.build_backbone(event_shape, **backbone)` (MLP for (d,), UNet for (C,H,W)),
    or, with `network` (a `teachers.load.network_spec` dict), over `DenoiserNet(<that denoiser>, sigma_data,
    network_scale, network_input_scale)` with fresh weights (`student_from_teacher` copies the teacher's in). `network={"kind": "external"}`
    marks a student over a copy of a teacher no spec describes: rebuilding it needs that `teacher` (its module is
    deep-copied; the weights come from the student's state_dict).

    Every argument but `teacher` is plain data, stored in `student.config`, so `build_student(**student.config)`
    rebuilds it.
    """
    config = dict(event_shape=[int(s) for s in event_shape], sigma_data=float(sigma_data), g=g,
                  backbone=dict(backbone or {}), cond_kind=cond_kind, num_classes=num_classes, cond_dim=cond_dim,
                  sigma_min=float(sigma_min), sigma_max=float(sigma_max), l2_init_scale=float(l2_init_scale))
    if network is None:
        net = build_backbone(tuple(event_shape), cond_kind=cond_kind, num_classes=num_classes, cond_dim=cond_dim,
                             **dict(backbone or {}))
    else:
        network = dict(network)
        config.update(network=network, network_scale=float(network_scale),
                      network_input_scale=float(network_input_scale), backbone={})
        if network.get("kind") == "external":
            if not isinstance(teacher, nn.Module):
                raise ValueError(
                    f"this student is an energy over a copy of a {network.get('teacher_kind', 'custom')} teacher's "
                    f"network, which no plain-data spec describes: rebuild it with its teacher, "
                    f"load_energy(path, teacher=teachers.load_teacher(<teacher config>)) (config when distilled: "
                    f"{network.get('teacher')})")
            den = copy.deepcopy(teacher)
        else:
            from teachers.load import build_network  # teachers own the architectures they adapt

            den = build_network(network)
        if hasattr(den, "clamp"):
            den.clamp = True  # the student's range is the teacher's: no per-evaluation range check (host sync)
        net = DenoiserNet(den.train().requires_grad_(True), sigma_data, network_scale, network_input_scale)
    return EnergyStudent(net, event_shape, sigma_data, g, sigma_min=sigma_min, sigma_max=sigma_max,
                         l2_init_scale=l2_init_scale, config=config)


def student_from_teacher(teacher: nn.Module, g: str = "ip", *, event_shape=None, sigma_data: float | None = None,
                         teacher_config: Mapping[str, Any] | None = None) -> EnergyStudent:
    """An energy student over a copy of `teacher`'s own network, warm-started from its weights (module docstring).

    `teacher` is any denoiser module `D(x, sigma[, cond])` (an EDMDenoiser, a diffusers / VP / VE / EDM adapter, your
    own); the student is conditional exactly when the teacher is (the copy takes the same `cond`). `g` is "ip"
    (f(u) = F(u/2): exact where F is affine and symmetric) or "l2" (f = F). `event_shape` defaults to the teacher's,
    `sigma_data` to the teacher's. A registered architecture (`teachers.load.TEACHER_NETWORKS`: EDM checkpoints,
    diffusers UNets) is recorded so `load_energy` rebuilds the student from its file alone; any other teacher is
    recorded as "external" with `teacher_config`, and `load_energy(path, teacher=...)` needs that teacher again.
    """
    from teachers.load import network_spec

    if g not in COPY_RULE:
        raise ValueError(f"a student over a copy of its teacher's network uses g in {sorted(COPY_RULE)}, got {g!r}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"student_from_teacher needs the teacher as a torch module, got {type(teacher).__name__}")
    event_shape = event_shape or getattr(teacher, "event_shape", None) or _diffusers_event_shape(teacher)
    if event_shape is None:
        raise ValueError("cannot tell the teacher's event shape: pass event_shape=(C, H, W) (or (d,))")
    sd = float(sigma_data if sigma_data is not None else getattr(teacher, "sigma_data", 0.5))
    spec = network_spec(teacher)
    if spec is None:
        spec = {"kind": "external", "teacher_kind": type(teacher).__name__,
                "teacher": dict(teacher_config) if teacher_config is not None else None}
    scale, input_scale = COPY_RULE[g]
    student = build_student(event_shape, sd, g, network=spec, network_scale=scale, network_input_scale=input_scale,
                            teacher=teacher,
                            sigma_min=float(getattr(teacher, "sigma_min", SIGMA_MIN)),
                            sigma_max=float(getattr(teacher, "sigma_max", SIGMA_MAX)))
    student.f.denoiser.load_state_dict(teacher.state_dict())
    return student


def _diffusers_event_shape(teacher: Any):
    cfg = getattr(getattr(getattr(teacher, "net", None), "unet", None), "config", None)
    if cfg is None:
        return None
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    return (cfg.in_channels, *((size, size) if isinstance(size, int) else size))


def warm_start_from(student: EnergyStudent, teacher: Any, strict: bool = False) -> bool:
    """Copy the teacher's backbone weights into the student's f_theta when the architectures match.

    The teacher's backbone is looked up as `teacher.net`, `teacher.backbone` or `teacher.model` (an nn.Module).
    Returns True if copied. With `strict`, a missing or mismatching backbone raises ValueError; otherwise False.
    """
    src = None
    for name in ("net", "backbone", "model"):
        cand = getattr(teacher, name, None)
        if isinstance(cand, nn.Module):
            src = cand
            break
    if src is None:
        if strict:
            raise ValueError(f"warm start: teacher {type(teacher).__name__} exposes no backbone (.net/.backbone/.model)")
        return False
    theirs, ours = src.state_dict(), student.f.state_dict()
    mismatch = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    extra = [k for k in theirs if k not in ours]
    if mismatch or extra:
        if strict:
            raise ValueError(f"warm start: teacher and student backbones differ ({len(mismatch)} missing/mismatched, "
                             f"{len(extra)} extra keys, e.g. {(mismatch + extra)[:3]})")
        return False
    student.f.load_state_dict(copy.deepcopy(theirs))
    return True


def save_student(student: EnergyStudent, path: str | Path, **extra: Any) -> Path:
    """Write a student's config and weights as a plain dict (loadable with `torch.load(weights_only=True)`)."""
    if student.config is None:
        raise TypeError("save_student needs a student made by fkdiff.energy.build_student (it records its config)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    torch.save({"format": FORMAT, "config": dict(student.config), "state_dict": state, **extra}, path)
    return path


def _find_student_file(path: Path, name: str | None) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no student at {path}; pass a student.pt, a distillation .ckpt or a run folder")
    if name is not None:
        cand = path / name / "student.pt"
        if not cand.is_file():
            raise FileNotFoundError(f"{cand} not found")
        return cand
    if (path / "student.pt").is_file():
        return path / "student.pt"
    found = sorted(path.glob("*/student.pt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no student.pt in {path} or its subfolders; was the distillation run finished?")
    raise ValueError(f"{path} holds several students ({', '.join(p.parent.name for p in found)}); "
                     f"pass name=<one of them>")


def load_energy(path: str | Path, device: torch.device | str | None = None, name: str | None = None,
                teacher: Any = None) -> EnergyStudent:
    """A trained energy student, in eval mode on `device`, from `python -m fkdiff.distill` output.

    `path`: a `student.pt`, a distillation Lightning checkpoint (`*.ckpt`; its state_dict holds the EMA weights), or a
    run folder (`name` picks one student when the folder holds several, e.g. toy2d's ring8 / strip).
    `teacher`: only for a student over a copy of a teacher whose architecture is not recorded ("external", see
    `student_from_teacher`): that teacher's module, loaded by you (with your own opt-ins).
    The result has `energy(x, sigma)`, `score(x, sigma)` and `__call__(x, sigma)` (the denoiser).
    """
    file = _find_student_file(Path(path), name)
    data = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping):
        raise ValueError(f"{file} is not a student checkpoint")
    if data.get("format") == FORMAT:
        config, state = data["config"], data["state_dict"]
    elif "fkdiff_student" in data and "state_dict" in data:
        config = data["fkdiff_student"]["config"]
        state = {k[len("student."):]: v for k, v in data["state_dict"].items() if k.startswith("student.")}
    else:
        raise ValueError(f"{file} is neither a student.pt ({FORMAT}) nor a fkdiff.distill Lightning checkpoint")
    student = build_student(**config, teacher=teacher)
    student.load_state_dict(state)
    return student.to(device).eval().requires_grad_(False)
