"""Builds the demo zoo: trains every model of a recipe and writes the run config.

Layout of ``out_dir``::

    models/<name>/      Hugging Face directories (safetensors float32, config, tokenizer)
    glue.yaml           the run config for ``glue run`` (paths relative to it)
    zoo.lock.json       recipe hash and per-model losses; written last

A build happens in a sibling temporary folder that replaces ``out_dir`` only when complete,
so an interrupted build never leaves a zoo that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from model_glue.env import configure_environment
from model_glue.zoo.config_file import config_is_current, write_run_config
from model_glue.zoo.recipe import ZOO_RECIPE, ZooRecipe, recipe_hash

LOCK_FILE = "zoo.lock.json"
CONFIG_FILE = "glue.yaml"


def build_demo_zoo(
    out_dir: str | Path,
    *,
    recipe: ZooRecipe = ZOO_RECIPE,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> Path:
    """Trains the zoo of ``recipe`` into ``out_dir`` unless an identical build is already there.

    Returns ``out_dir``. The cache check compares the recipe hash recorded in
    ``zoo.lock.json`` and the presence of every model directory and of ``glue.yaml``.
    """
    configure_environment()
    out = Path(out_dir).absolute()
    say = progress or (lambda _msg: None)
    wanted = recipe_hash(recipe)
    if not force and is_current(out, recipe, wanted):
        if not config_is_current(out):
            write_run_config(out, recipe)
            say(f"rewrote {out / CONFIG_FILE} (newer config format)")
        say(f"demo zoo at {out} is current ({wanted[:12]})")
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _train_all(tmp, recipe, wanted, say)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_current(out: Path, recipe: ZooRecipe = ZOO_RECIPE, wanted: str | None = None) -> bool:
    """Whether ``out`` holds a complete build of ``recipe``."""
    lock = out / LOCK_FILE
    try:
        recorded = json.loads(lock.read_text())["recipe_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if recorded != (wanted or recipe_hash(recipe)):
        return False
    models_ok = all(
        (out / "models" / name / "model.safetensors").is_file() for name in recipe.model_names
    )
    return models_ok and (out / CONFIG_FILE).is_file()


def _train_all(tmp: Path, recipe: ZooRecipe, wanted: str, say: Callable[[str], None]) -> None:
    import torch

    from model_glue.zoo.tokenizer import build_char_tokenizer
    from model_glue.zoo.train import fine_tune, pretrain_base

    tokenizer = build_char_tokenizer()
    started = time.perf_counter()
    models: dict[str, dict] = {}
    trained = {}
    for spec in recipe.bases:
        t0 = time.perf_counter()
        model, loss = pretrain_base(spec, recipe.shape, tokenizer)
        trained[spec.name] = model
        models[spec.name] = _save(
            model, tokenizer, tmp, spec.name, loss, time.perf_counter() - t0, base=None
        )
        say(
            f"trained {spec.name}: {spec.schedule.steps} steps, loss {loss:.3f}, {models[spec.name]['seconds']:.0f}s"
        )
    for spec in recipe.fine_tunes:
        t0 = time.perf_counter()
        base_spec = next(b for b in recipe.bases if b.name == spec.base)
        model, loss = fine_tune(spec, trained[spec.base], tokenizer, base_spec)
        models[spec.name] = _save(
            model, tokenizer, tmp, spec.name, loss, time.perf_counter() - t0, base=spec.base
        )
        say(
            f"trained {spec.name}: {spec.schedule.steps} steps, loss {loss:.3f}, {models[spec.name]['seconds']:.0f}s"
        )
        del model
    del trained
    write_run_config(tmp, recipe)
    lock = {
        "recipe_hash": wanted,
        "torch": torch.__version__,
        "train_seconds": round(time.perf_counter() - started, 1),
        "models": models,
    }
    (tmp / LOCK_FILE).write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")


def _save(
    model, tokenizer, root: Path, name: str, loss: float, seconds: float, base: str | None
) -> dict:
    from transformers.utils import logging as hf_logging

    path = root / "models" / name
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per tiny file is noise
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
    return {"base": base, "final_loss": round(loss, 4), "seconds": round(seconds, 1)}


def _replace_dir(new: Path, out: Path) -> None:
    """Moves ``new`` to ``out``; an old ``out`` is first moved aside and then deleted."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
