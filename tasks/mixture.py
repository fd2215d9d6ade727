"""Stage 4: combine the clusters' models with a mixture (the paper's final recipe).

The variant (``model_glue/mixture/variants``: model-level, block-level, FFN-level,
hybrid) is named by its settings and builds the directory; router accuracy exists only for
variants that route whole samples.

Experts are the clusters' outputs (a merged model, or the single member of a singleton
cluster). The router is training-free: each task's example prompts (from the run config,
never test items) are given to the expert that scores best on that task, and the prompts of
the other tasks serve as its negatives. The mixture directory references its experts by
path; it is content-addressed by the experts' fingerprints, the router settings and prompts.
"""

from __future__ import annotations

from storage import Artifact, ArtifactStore, Lineage
from tasks.evaluate import task_files_hash
from tasks.stage import RECORD_KIND, Call, Stage
from tasks.versions import MIXTURE

MIXTURE_KIND = "mixture"


def assign_prompts(
    experts: list[str], task_scores: dict[str, dict[str, float]], task_prompts: dict[str, list[str]]
) -> dict[str, dict[str, list[str]]]:
    """Give each task's prompts to its best expert (ties: first in ``experts`` order); every
    other task's prompts are that expert's negatives. Experts best at no task are left out:
    the router could never send anything to them for a reason."""
    owner = {
        t: max(experts, key=lambda e: (task_scores.get(e, {}).get(t, 0.0), -experts.index(e)))
        for t in task_prompts
    }
    out = {}
    for e in experts:
        if e not in owner.values():
            continue
        pos = [p for t, ps in task_prompts.items() if owner[t] == e for p in ps]
        neg = [p for t, ps in task_prompts.items() if owner[t] != e for p in ps]
        out[e] = {"positive": pos, "negative": neg}
    return out


def _mixture(
    store: ArtifactStore,
    key: str,
    experts: list[dict],
    backbone: dict,
    settings: dict,
    prompts: dict[str, dict[str, list[str]]],
    accuracy_tasks: list[str],
    accuracy_limit: int | None,
    include_paths: list[str] = (),  # type: ignore[assignment]
    accuracy_metric: str | dict[str, str] | None = None,
    labels: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int | str = 32,
) -> dict:
    """``experts``: refs with name, fingerprint and a local directory ``uri``;
    ``backbone`` one of them; ``settings``: the variant's settings (the run config's
    ``mixture`` section, router resolved). A fitted router is fitted on the proxy labels
    of the expert selection whose record key is ``labels``; router accuracy is measured on
    ``accuracy_tasks`` (mixtures that route whole samples). Routing, router fitting and
    router accuracy run on ``device`` in ``dtype``."""
    # imported here: transformers' model classes cost seconds, and a cached rerun needs none
    from model_glue.evaluate import quiet_lm_eval
    from model_glue.mixture import expert_correctness, mixture_router_accuracy
    from model_glue.mixture.routers import ROUTERS, RouterInit
    from model_glue.mixture.variants import VARIANTS, BuildInputs, build_mixture, load_mixture

    s = VARIANTS[settings["variant"]].settings.model_validate(settings)
    router = ROUTERS[s.router_used()]
    gate = (
        _fitted_router(store, labels, experts, backbone, s, device, dtype)
        if router.fitted
        else RouterInit(method=router.name)
    )
    with store.writing(MIXTURE_KIND, key, meta={"stage": "mixture"}) as tmp:
        out = tmp / "mixture"
        build_mixture(
            s,
            BuildInputs(
                experts=[e["uri"] for e in experts],
                names=[e["name"] for e in experts],
                backbone=backbone["uri"],
                out=out,
                router=gate,
                prompts=prompts or None,  # routers that need none take none
                # experts that are store artifacts (merged models) travel with the store
                relative_to=store.root if store.is_local else None,
                location=store.published_path(MIXTURE_KIND, key) if store.is_local else None,
                device=device,
                dtype=dtype,
            ),
        )
        for f in out.iterdir():
            f.rename(tmp / f.name)
        out.rmdir()
    path = store.local_path(MIXTURE_KIND, key)
    accuracy = []
    if accuracy_tasks and s.spec.routes_samples:
        mixture = load_mixture(path, device=device, dtype=dtype)
        with quiet_lm_eval():
            correct = expert_correctness(
                mixture,
                accuracy_tasks,
                limit=accuracy_limit,
                metric=accuracy_metric,
                include_paths=include_paths,
                batch_size=batch_size,
            )
        accuracy = [
            {
                "task": a.task,
                "metric": "router_accuracy",
                "value": a.accuracy,
                "n_samples": a.n_answerable,
                "coverage": a.coverage,
            }
            for a in mixture_router_accuracy(mixture, correct)
            if a.accuracy is not None
        ]
    return {
        "artifact_id": key,
        "uri": store.uri(MIXTURE_KIND, key),
        "path": str(path),
        "experts": [{"name": e["name"], "fingerprint": e["fingerprint"]} for e in experts],
        "backbone": backbone["name"],
        "variant": s.variant,
        "router": router.name,
        "layer": getattr(s, "layer", None),
        "router_accuracy": accuracy,
        # identity for evaluation: the directory's content (router weights + expert refs);
        # the experts' own fingerprints are already part of the key
        "fingerprint": store.manifest(MIXTURE_KIND, key).content_hash[:32],
    }


def _fitted_router(
    store: ArtifactStore,
    labels: str | None,
    experts: list[dict],
    backbone: dict,
    s,
    device: str = "cpu",
    dtype: str = "float32",
):
    """A linear gate fitted on the selection's proxy labels (which expert answers which
    proxy document), on the features the mixture's router reads."""
    import torch

    from model_glue.mixture import MixtureError
    from model_glue.mixture.routers import fit_linear_router
    from tasks.select import router_features

    if not s.spec.routes_samples or labels is None:
        raise MixtureError(
            "mixture.router: a fitted router is fitted on the proxy labels of the expert "
            "selection of a mixture that routes whole samples (model_level)"
        )
    selection = store.get_json(RECORD_KIND, labels)
    columns = [selection["candidates"].index(e["name"]) for e in experts]
    correct = torch.tensor(selection["correct"])[:, columns]
    features = router_features(
        backbone["uri"], selection["contexts"], s.layer, s.pooling, device, dtype
    )
    return fit_linear_router(features, correct)


def _lineage(call: Call, r: dict) -> Lineage:
    backbone = call.params["backbone"]
    parents = tuple((e["artifact_id"], "expert") for e in call.params["experts"])
    return Lineage(
        artifacts=[
            Artifact(
                r["artifact_id"],
                kind="mixture",
                name=call.label,
                uri=r["uri"],
                content_hash=r["fingerprint"],
                stage="mixture",
                parents=parents + ((backbone["artifact_id"], "backbone"),),
                meta={
                    k: r.get(k)
                    for k in ("variant", "router", "layer", "backbone", "router_accuracy")
                },
            )
        ]
    )


def _describe(r: dict) -> list[str]:
    return [
        f"router accuracy {a['task']:<12} {a['value']:.3f} (n={a['n_samples']})"
        for a in r["router_accuracy"]
    ]


STAGE = Stage(
    name="mixture",
    compute=_mixture,
    uses=MIXTURE,
    not_in_key={
        "device": "where it runs; the dtype routing runs in is keyed",
        "batch_size": "lm-eval's scores do not depend on it",
    },
    key_parts=lambda a: {
        "experts": [(e["name"], e["fingerprint"]) for e in a["experts"]],
        "backbone": a["backbone"]["fingerprint"],
        "accuracy_tasks": sorted(a["accuracy_tasks"]),
        "include_paths": task_files_hash(a["include_paths"]) if a["accuracy_tasks"] else None,
    },
    lineage=_lineage,
    describe=_describe,
    outputs=(MIXTURE_KIND,),
    pending=lambda c: {"router_accuracy": []},
)

mix_experts = STAGE.task()
