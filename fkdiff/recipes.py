"""Hydra recipes: one small config per dataset/experiment in the top-level `recipes/` folder.

Every entry point (`python -m fkdiff.distill`, `python -m teachers.train`, `python -m fkdiff.sample`) composes the
primary config `fkdiff/conf/config.yaml` and one recipe, selected with `recipe=<name>`. A recipe lists only its
differences from the primary config (it is merged at the global package).

Recipes are found, in order, in: `$FKDIFF_RECIPES`, the checkout's `recipes/` next to the `fkdiff` package, and
`<sys.prefix>/share/fkdiff/recipes` (where a non-editable install puts them). Each `*.yaml` there is registered in
Hydra's ConfigStore as option `recipe=<stem>` before `hydra.main` runs, so the recipes work from any working
directory.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

__all__ = ["recipes_dir", "available_recipes", "register_recipes", "compose", "main", "UnknownRecipeError"]

CONFIG_MODULE = "fkdiff.conf"
CONFIG_NAME = "config"


class UnknownRecipeError(KeyError):
    pass


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


def register_recipes() -> list[str]:
    """Store every recipe in Hydra's ConfigStore as group `recipe`, package `_global_`. Idempotent."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    names = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="recipe", name=path.stem, node=node, package="_global_")
        names.append(path.stem)
    return names


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
    """Compose the primary config with overrides (e.g. ["recipe=toy2d", "trainer.max_steps=5"]), outside hydra.main.

    Used by tests and notebooks. Hydra-runtime interpolations (`${hydra:...}`) are not available here; the
    returned config has `run_dir` resolved from the overrides or the default.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    _check_recipe(overrides)
    register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return cfg


def main(task_fn: Callable[[DictConfig], object], config_name: str = CONFIG_NAME, task: str | None = None) -> None:
    """Run `task_fn(cfg)` under `hydra.main` with the recipes registered; an unknown recipe exits with the list."""
    import hydra

    try:
        _check_recipe(sys.argv[1:])
    except UnknownRecipeError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    register_recipes()
    if task is not None and not any(a.startswith("task=") for a in sys.argv[1:]):
        sys.argv.append(f"task={task}")

    @hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name, version_base="1.3")
    @functools.wraps(task_fn)
    def _run(cfg: DictConfig):
        return task_fn(cfg)

    _run()
