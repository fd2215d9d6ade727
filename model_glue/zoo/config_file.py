"""Writes the demo zoo's run config (``glue.yaml``) for ``glue run``.

The similarity threshold is ``auto`` (chosen by the run from the measured values); the
builder checks that the paper's column-cosine similarity (attention + MLP matrices) of the
freshly trained zoo separates its families, and records the within- and across-family
values in a comment so a reader can see the gap that ``auto`` will find.
"""

from __future__ import annotations

import json
from pathlib import Path

from model_glue.zoo.recipe import ZooRecipe

SIMILARITY_GROUPS = ("attn", "mlp")
CONFIG_VERSION = (
    7  # bump when the written config changes: a cached zoo then only rewrites glue.yaml
)
_MARKER = f"# written by model-glue's demo zoo builder (config v{CONFIG_VERSION})"
ROUTER_PROMPTS_PER_TASK = 8
ROUTER_PROMPT_SEED = 7


def config_is_current(zoo_dir: Path) -> bool:
    path = zoo_dir / "glue.yaml"
    return path.is_file() and path.read_text().startswith(_MARKER)


def router_prompts(recipe: ZooRecipe) -> dict[str, list[str]]:
    """Example inputs per task for the mixture router, drawn from the *training* split."""
    import random

    from model_glue.zoo.skills import SKILLS

    rng = random.Random(ROUTER_PROMPT_SEED)
    return {
        f"demo_{t}": [SKILLS[t].sample(rng, "train").prompt for _ in range(ROUTER_PROMPTS_PER_TASK)]
        for t in recipe.eval_tasks
    }


def family_of(recipe: ZooRecipe) -> dict[str, str]:
    """Model name -> the base it descends from (a base is its own family)."""
    families = {b.name: b.name for b in recipe.bases}
    families.update({ft.name: ft.base for ft in recipe.fine_tunes})
    return families


def measured_similarity(zoo_dir: Path, recipe: ZooRecipe) -> tuple[list[float], list[float]]:
    """sim_all of every pair inside one family and of every pair across families."""
    from model_glue.checkpoint import Checkpoint
    from model_glue.similarity import pairwise_similarity

    families = family_of(recipe)
    checkpoints = {name: Checkpoint(str(zoo_dir / "models" / name)) for name in families}
    result = pairwise_similarity(checkpoints, groups=SIMILARITY_GROUPS)
    within, across = [], []
    for (a, b), row in result.summary.items():
        (within if families[a] == families[b] else across).append(row["sim_all"])
    return within, across


def write_run_config(zoo_dir: Path, recipe: ZooRecipe) -> Path:
    within, across = measured_similarity(zoo_dir, recipe)
    if within and across and min(within) <= max(across):
        raise RuntimeError(
            f"demo zoo: families do not separate by similarity (within >= {min(within):.3f}, "
            f"across <= {max(across):.3f}); the recipe needs more distinct bases"
        )
    families = family_of(recipe)
    lines = [_MARKER, "name: demo", "zoo:"]
    for name in recipe.model_names:
        base = families[name]
        extra = f", base: {base}" if base != name else ""
        lines.append(f"  - {{name: {name}, path: models/{name}{extra}}}")
    lines += [
        f"# threshold auto: the widest gap in the measured sim_all ({'+'.join(SIMILARITY_GROUPS)} column",
        f"# cosine); when built, same-family pairs were {_span(within)}, cross-family {_span(across)}",
        f"similarity: {{tensors: [{', '.join(SIMILARITY_GROUPS)}], threshold: auto}}",
        "# selective merging (the paper's Heuristic Average): best model first, a candidate is kept",
        "# only if the proxy score (100 documents per task) does not drop; noisy-a is dropped",
        "filter: {strategy: average, proxy_limit: 100}",
        "# TIES on the declared bases; bench/paper_tables.py compares the methods (docs/paper_tables.md)",
        "merge: {method: ties, params: {density: 0.5}}",
        f"evaluation: {{tasks: [{', '.join('demo_' + t for t in recipe.eval_tasks)}], limit: null}}",
        "# the paper's final recipe: a model-level mixture. Its experts are chosen greedily on the",
        "# validation (proxy) split among every cluster's model and every model the search rejected,",
        "# and a linear router is fitted there; the run's final model is the best of the mixture,",
        "# the merges and the zoo on that split. router: hidden takes these example prompts instead",
        "# (training-split inputs, never test items; each task's go to its best expert).",
        "mixture:",
        "  variant: model_level",
        "  router: linear",
        "  layer: 2",
        "  prompts:",
    ]
    for task, prompts in router_prompts(recipe).items():
        lines.append(f"    {task}: [{', '.join(json.dumps(p) for p in prompts)}]")
    path = zoo_dir / "glue.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _span(values: list[float]) -> str:
    return f"{min(values):.3f}..{max(values):.3f}" if values else "(none)"
