"""Hydra for fkdiff's entry points: recipes, config-group aliases, EDM constants, and running a task.

Every entry point (`python -m fkdiff.distill`, `python -m teachers.train`, `python -m fkdiff.sample`) composes the
primary config `fkdiff/conf/config.yaml` (groups `data`, `teacher`, `logger`) and one recipe, `recipe=<name>`. A recipe
is an experiment config in the top-level `recipes/` folder, merged at the global package: its defaults list picks
group options (`override /data: digits`) and its body lists only its differences.

Before composing, `register()` stores in Hydra's ConfigStore
- every `recipes/*.yaml` as option `recipe=<stem>`. Recipes are found, in order, in `$FKDIFF_RECIPES`, the checkout's
  `recipes/` next to the `fkdiff` package, and `<sys.prefix>/share/fkdiff/recipes` (a non-editable install), so they
  work from any working directory;
- `diffusion`: EDM's constants from `fkdiff.diffusion` (sigma_min, sigma_max, p_mean, p_std), so the config reads
  `${diffusion.p_mean}` instead of writing the numbers again;
- the alias groups `teacher.kind` and `logger.kind`: `teacher.kind=vp` selects `teacher=vp` (a group option has
  only its kind's keys, so a plain value override could not bring them).

`main(task_fn, task=...)` runs `task_fn(cfg)` under `hydra.main` with a primary config that sets `task` (no change to
`sys.argv`), takes the run folder from Hydra (so DDP children launched by Lightning share it), and removes the run
folder of a failed run when it holds nothing but Hydra's and the run's bookkeeping files (never a folder that another
run owns).

Resume (`run_dir=<run> distill.ckpt_path=last`, or `train_teacher.ckpt_path=...`): `resume_config` makes the run's own
saved `<run_dir>/config.yaml` the config, with only the keys the command line gives put on top, so a resume trains
the same model for the same number of steps with the same checkpoint interval as the run it continues, whatever the
recipe defaults are today; keys that a newer fkdiff added after the run saved its config take today's values (printed).
A config group given on the command line (`recipe=`, `data=`, `teacher=`) must select what the run already uses (its
`data.name` / `teacher.kind`; the run's own values stay), `logger=` may switch the logger. `compose` and `main` both
apply it.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

__all__ = ["recipes_dir", "available_recipes", "register", "register_recipes", "compose", "main", "run_task",
           "resume_config", "UnknownRecipeError", "DropLoggers", "ALIAS_GROUPS", "RESUMABLE_TASKS"]

CONFIG_MODULE = "fkdiff.conf"
CONFIG_NAME = "config"
ALIAS_GROUPS = ("teacher", "logger")  # <group>.kind=<option> selects <group>=<option>
_BOOKKEEPING = {".hydra", "config.yaml", ".lock"}  # besides *.log: what a run writes before it has results
RESUMABLE_TASKS = ("distill", "train_teacher")  # <task>.ckpt_path resumes the run in run_dir


class UnknownRecipeError(KeyError):
    pass


class DropLoggers(logging.Filter):
    """A logging filter that drops the records of the named loggers and their children (used in hydra.job_logging:
    Lightning prints its messages with its own handler, so Hydra's console handler skips them)."""

    def __init__(self, names: Iterable[str] = ()):
        super().__init__()
        self.names = tuple(names)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == n or record.name.startswith(n + ".") for n in self.names)


def recipes_dir() -> Path:
    """The folder holding the recipes (see module docstring for the search order)."""
    env = os.environ.get("FKDIFF_RECIPES")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "recipes", Path(sys.prefix) / "share" / "fkdiff" / "recipes"]
    for c in candidates:
        if c.is_dir() and any(c.glob("*.yaml")):
            return c
    raise FileNotFoundError(
        "no recipes folder found; looked in " + ", ".join(str(c) for c in candidates)
        + ". Set FKDIFF_RECIPES to a folder of recipe *.yaml files."
    )


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(__file__).resolve().parent / "conf" / group).glob("*.yaml"))


def register() -> list[str]:
    """Store the recipes, the `diffusion` constants and the alias groups in Hydra's ConfigStore. Idempotent.
    Returns the recipe names."""
    from hydra.core.config_store import ConfigStore

    from fkdiff import diffusion

    cs = ConfigStore.instance()
    cs.store(name="diffusion", package="diffusion",
             node={"sigma_min": diffusion.SIGMA_MIN, "sigma_max": diffusion.SIGMA_MAX, "p_mean": diffusion.P_MEAN,
                   "p_std": diffusion.P_STD})
    for group in ALIAS_GROUPS:
        for option in _group_options(group):
            cs.store(group=f"{group}.kind", name=option, package="_global_",
                     node=OmegaConf.create({"defaults": [{f"override /{group}": option}]}))
    names = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


register_recipes = register  # the earlier name


def _check_recipe(overrides: Sequence[str]) -> None:
    for o in overrides:
        if o.startswith("recipe="):
            name = o.split("=", 1)[1]
            if name not in available_recipes():
                raise UnknownRecipeError(
                    f"unknown recipe {name!r}; available recipes: {', '.join(available_recipes())} "
                    f"(in {recipes_dir()})"
                )


def compose(overrides: Sequence[str] = (), config_name: str = CONFIG_NAME) -> DictConfig:
    """Compose the primary config with overrides (e.g. ["recipe=toy2d", "distill.max_steps=5"]), outside hydra.main.

    Used by tests and notebooks (`task=<task>` sets the task). Hydra-runtime interpolations (`${hydra:...}`) are not
    available here; the returned config has `run_dir` resolved from the overrides or the default.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    _check_recipe(overrides)
    register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return resume_config(cfg, overrides)


def _resume_requested(cfg: DictConfig) -> bool:
    task = cfg.get("task")
    if task not in RESUMABLE_TASKS:
        return False
    return OmegaConf.select(cfg, f"{task}.ckpt_path") not in (None, "", "null", "none")


def _group_sections() -> dict[str, str]:
    """Command-line config-group keys -> the config section they fill (`recipe` fills the whole config: "")."""
    out = {"recipe": ""}
    for group in ("data", *ALIAS_GROUPS):
        out[group] = group
        out[f"{group}.kind"] = group
    return out


# what identifies a config group's option in a resolved config (`recipe`: the data and teacher it picks)
_GROUP_IDENTITY = {"": ("data.name", "teacher.kind"), "data": ("data.name",), "teacher": ("teacher.kind",)}


def resume_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The config of a resumed run: `<run_dir>/config.yaml` with the command line's value overrides on top (module
    docstring). Returns `cfg` unchanged when it does not resume (`<task>.ckpt_path` unset) or when `run_dir` holds no
    saved config yet (a run killed before it wrote one starts afresh)."""
    if not _resume_requested(cfg):
        return cfg
    saved_path = Path(str(cfg.run_dir)) / "config.yaml"
    if not saved_path.is_file():
        return cfg
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fkdiff.training.trainer import TASK_KNOBS, ConfigError

    saved = OmegaConf.load(saved_path)
    groups, values = _group_sections(), []
    chosen_groups = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if key.startswith("hydra.") or key == "hydra":
            continue
        if o.is_delete():
            raise ConfigError(f"~{key}: deleting a key is not possible when resuming a run (run_dir={cfg.run_dir})")
        (chosen_groups if key in groups and o.package is None else values).append(key)
    composed = OmegaConf.to_container(cfg, resolve=True)
    plain = OmegaConf.create(composed)
    changed = []
    for key in values:
        new = OmegaConf.select(plain, key)
        old = OmegaConf.select(saved, key, default="<absent>")
        OmegaConf.update(saved, key, new, force_add=True, merge=False)
        if key not in ("run_dir", f"{cfg.task}.ckpt_path") and old != OmegaConf.select(saved, key):
            changed.append(f"{key}: {old} -> {OmegaConf.select(saved, key)}")
    saved.run_dir = str(cfg.run_dir)
    added = _add_keys_missing_from(saved, plain)
    raw_trainer = OmegaConf.to_container(cfg.trainer, resolve=False)
    for key in TASK_KNOBS:  # trainer.max_steps etc. follow the task's knob again (config.yaml holds resolved values)
        if key in cfg.trainer and OmegaConf.is_interpolation(cfg.trainer, key):
            saved.trainer[key] = raw_trainer[key]
    for key in chosen_groups:
        section = groups[key]
        if section == "logger":  # the logger does not change what is trained: switching it on resume is allowed
            saved.logger = plain.logger
            continue
        ids = _GROUP_IDENTITY.get(section, _GROUP_IDENTITY[""])
        diff = [k for k in ids if OmegaConf.select(plain, k) != OmegaConf.select(saved, k)]
        if diff:
            shown = "; ".join(f"{k}: the run has {OmegaConf.select(saved, k)!r}, {key}=... gives "
                              f"{OmegaConf.select(plain, k)!r}" for k in diff)
            raise ConfigError(
                f"resuming {cfg.run_dir}: {key}=... selects another {section or 'recipe'} than the run's ({shown}). A "
                f"resumed run keeps its saved config.yaml (the command line's key=value overrides go on top); drop "
                f"{key}=..., or start a new run in another run_dir.")
    if changed and _is_rank_zero():
        print(f"resuming {cfg.run_dir} with its saved config; changed on the command line: " + ", ".join(changed))
    if added and _is_rank_zero():
        print(f"resuming {cfg.run_dir}: its saved config.yaml predates these keys; they take today's values: "
              + ", ".join(added))
    OmegaConf.set_struct(saved, True)
    return saved


def _add_keys_missing_from(saved: DictConfig, composed: DictConfig) -> list[str]:
    """Put into `saved` every key of `composed` it lacks (keys fkdiff added after the run saved its config.yaml, which
    today's code reads), in place; returns them as `key=value`. A section of a config group (`data`, `teacher`,
    `logger`, `sample.mcmc`) whose option differs from the run's (its `kind`, data's `name`) is left alone: the
    option's own keys do not belong to the run."""
    added: list[str] = []

    def same_option(old: DictConfig, new: DictConfig, name: str) -> bool:
        ids = ("name",) if name == "data" else ("kind",)
        return all(k not in old or k not in new or old[k] == new[k] for k in ids)

    def walk(old: DictConfig, new: DictConfig, prefix: str) -> None:
        for key in new:
            value, name = new[key], f"{prefix}{key}"
            if key not in old:
                old[key] = value
                added.append(name if isinstance(value, DictConfig) else f"{name}={value}")
            elif isinstance(value, DictConfig) and isinstance(old[key], DictConfig) and same_option(old[key], value,
                                                                                                    name):
                walk(old[key], value, f"{name}.")

    walk(saved, composed, "")
    return added


def _entry_config(task: str, base: str) -> str:
    """Store (and name) the primary config of an entry point: `base` with `task` set."""
    from hydra.core.config_store import ConfigStore

    name = f"fkdiff_{task}"
    ConfigStore.instance().store(name=name, node=OmegaConf.create({"defaults": [base, "_self_"], "task": task}))
    return name


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def remove_if_no_results(run_dir: str | Path) -> bool:
    """Delete `run_dir` if it holds nothing but bookkeeping (Hydra's `.hydra/`, `*.log`, `config.yaml`). Returns
    whether it was deleted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    for p in run_dir.iterdir():
        if p.name not in _BOOKKEEPING and not (p.is_file() and p.suffix == ".log"):
            return False
    shutil.rmtree(run_dir, ignore_errors=True)  # Hydra's log file may still be open
    return not run_dir.exists()


def run_task(task_fn: Callable[[DictConfig], object], cfg: DictConfig):
    """`task_fn(cfg)` with `cfg.run_dir` set to Hydra's run folder; a failed run's folder is removed if it holds no
    results (`remove_if_no_results`)."""
    from hydra.core.hydra_config import HydraConfig

    from fkdiff.training.rundir import RunDirBusy, RunDirNotEmpty

    if HydraConfig.initialized():
        # under DDP Lightning relaunches the script with hydra.run.dir fixed: a `${now:...}` run_dir would resolve to
        # another folder in the child processes
        OmegaConf.set_struct(cfg, False)
        cfg.run_dir = str(HydraConfig.get().run.dir)
        OmegaConf.set_struct(cfg, True)
        cfg = resume_config(cfg, HydraConfig.get().overrides.task)
    try:
        return task_fn(cfg)
    except (RunDirBusy, RunDirNotEmpty):
        raise  # the folder belongs to another run: never clean it up
    except BaseException:
        resumed_run = _resume_requested(cfg) and (Path(str(cfg.run_dir)) / "config.yaml").is_file()
        if _is_rank_zero() and not resumed_run:  # a failed resume keeps the run it was resuming
            remove_if_no_results(cfg.run_dir)
        raise


def main(task_fn: Callable[[DictConfig], object], config_name: str = CONFIG_NAME, task: str | None = None) -> None:
    """Run `task_fn(cfg)` under `hydra.main` (see module docstring); an unknown recipe exits with the list."""
    import hydra

    try:
        _check_recipe(sys.argv[1:])
    except UnknownRecipeError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    register()
    name = _entry_config(task, config_name) if task is not None else config_name

    @hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=name, version_base="1.3")
    @functools.wraps(task_fn)
    def _run(cfg: DictConfig):
        return run_task(task_fn, cfg)

    _run()
