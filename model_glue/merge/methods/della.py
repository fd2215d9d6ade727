"""DELLA (Deep et al. 2024): MAGPRUNE drops task-vector entries at random, the larger ones
less often, rescales, then combines.

Within each row of a task vector, entries are ranked by magnitude and kept with
probabilities from ``density - epsilon`` (the smallest) to ``density + epsilon`` (the
largest); see ``sparsify.magprune_``. ``della`` combines the result with the TIES sign
election, ``della_linear`` adds it. Masks are seeded per (seed, tensor, model), as DARE's.

``rescale``: ``l1`` restores each task vector's L1 norm (what mergekit 0.1.5 does with
``rescale: true``, so ``true`` means ``l1`` here); ``inverse_density`` divides each kept
entry by its own keep probability (the DELLA paper); ``none`` keeps them as they are.

Not chunked: a rank needs whole rows. The method works on blocks of rows, so beyond the
engine's float32 copies of the inputs it holds a few block-sized buffers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from model_glue.merge.methods._common import (
    DENSITY,
    LAMBDA,
    SEED,
    WEIGHT,
    normalize,
    sign_consensus_merge,
    task_vectors_,
    weighted_sum_merge,
)
from model_glue.merge.params import MergeConfigError, Param
from model_glue.merge.registry import merge_method
from model_glue.merge.sparsify import magprune_, mask_seed

EPSILON = Param(
    "epsilon",
    float,
    per_model=True,
    default=0.15,
    help="keep probabilities run from density - epsilon (smallest magnitude in a row) to density + epsilon (largest)",
    minimum=0.0,
    maximum=0.5,
)
RESCALE = Param(
    "rescale",
    str,
    per_model=False,
    default="l1",
    help="how kept entries are rescaled",
    choices=("l1", "inverse_density", "none"),
    aliases={True: "l1", False: "none"},
)


def check_epsilon(values: Mapping[str, Any], names: Sequence[str]) -> None:
    """mergekit's rule: with 0 < density < 1, density - epsilon and density + epsilon
    must lie strictly inside (0, 1), so that every probability is one."""
    for density, epsilon, name in zip(values["density"], values["epsilon"], names, strict=True):
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            raise MergeConfigError(
                f"model {name!r}: epsilon={epsilon} with density={density} puts density "
                f"{'+' if density + epsilon >= 1 else '-'} epsilon outside (0, 1); epsilon "
                f"must be below min(density, 1 - density) = {min(density, 1 - density):g}"
            )


def _prune(taus, params, ctx) -> list[float]:
    """MAGPRUNE each task vector in place; return each one's rescale factor."""
    rescale = params["rescale"]
    scales = []
    for tau, density, epsilon, model in zip(
        taus, params["density"], params["epsilon"], ctx.model_names, strict=True
    ):
        drop = magprune_(
            tau,
            density,
            epsilon,
            mask_seed(params["seed"], ctx.tensor_name, model),
            inverse=rescale == "inverse_density",
            measure_l1=rescale == "l1",
        )
        before, after = drop.l1_before, drop.l1_after
        # mergekit's guard: a (near) zero norm before or after leaves the entries as they are
        ok = rescale == "l1" and before >= 1e-7 and after >= 1e-7
        scales.append(before / after if ok else 1.0)
    return scales


@merge_method(
    "della",
    params=(WEIGHT, DENSITY, EPSILON, LAMBDA, normalize(True), RESCALE, SEED),
    base="required",
    summary="drop task-vector entries at random, larger magnitudes less often, rescale, TIES sign election and disjoint mean",
    reference="https://arxiv.org/abs/2406.11617",
    check=check_epsilon,
)
def della_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    scales = _prune(taus, params, ctx)
    return sign_consensus_merge(
        base, taus, params["weight"], params["lambda"], params["normalize"], scales
    )


@merge_method(
    "della_linear",
    params=(WEIGHT, DENSITY, EPSILON, LAMBDA, normalize(False), RESCALE, SEED),
    base="required",
    summary="drop task-vector entries at random, larger magnitudes less often, rescale, add to the base",
    reference="https://arxiv.org/abs/2406.11617",
    check=check_epsilon,
)
def della_linear_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    scales = _prune(taus, params, ctx)
    return weighted_sum_merge(
        base, taus, params["weight"], params["lambda"], params["normalize"], scales
    )
