"""Stage 3: merge each cluster's selected members into one Hugging Face model.

The merged model is content-addressed by (method, parameters, member fingerprints with
their per-model parameters, engine version): the same merge is never written twice, and a
changed member or parameter produces a new artifact beside the old one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from model_glue.fingerprint import fingerprint_checkpoint
from model_glue.merge import MergeSpec, ModelInput, merge_to_directory
from model_glue.merge.tokenizer import config_vocab_sizes, pipeline_tokenizer
from storage import Artifact, ArtifactStore, Lineage
from tasks.stage import Call, Stage
from tasks.versions import ENGINE

MODEL_KIND = "model"


def merge_spec(
    members: list[dict],
    method: str,
    params: dict,
    dtype: str | None,
    base: dict | None,
    tokenizer: str | None = "union",
) -> MergeSpec:
    """The engine's spec for a cluster merge; members in fingerprint order (listing order
    never matters). Raises the engine's error, naming the key, for bad parameters.
    ``tokenizer``: union, base or a zoo model's name, which is the union for a cluster
    that does not hold that model."""
    names = [m["name"] for m in members] + ([base["name"]] if base else [])
    tokenizer = pipeline_tokenizer(tokenizer, names)
    if base and tokenizer == base["name"]:  # the spec names its base by its location
        tokenizer = "base"
    base_fp = base["fingerprint"] if base else None
    # the base enters through its task-vector role only, never also as a member
    ordered = sorted(
        (m for m in members if m["fingerprint"] != base_fp), key=lambda m: m["fingerprint"]
    )
    return MergeSpec(
        method=method,
        models=[
            ModelInput(uri=m["uri"], name=m["name"], params=m.get("params") or {}) for m in ordered
        ],
        base=base["uri"] if base else None,
        params=params,
        dtype=dtype,
        tokenizer=tokenizer,
    )


def _fingerprints(members: list[dict], base: dict | None) -> dict[str, str]:
    return {m["name"]: m["fingerprint"] for m in members} | (
        {base["name"]: base["fingerprint"]} if base else {}
    )


def _identity(a: dict) -> dict:
    """The canonical spec (defaults filled in, names included: DARE seeds its masks by
    name) and the inputs' fingerprints by name: what the merged weights depend on."""
    spec = merge_spec(a["members"], a["method"], a["params"], a["dtype"], a["base"], a["tokenizer"])
    return {
        "params": spec.canonical(),
        "members": sorted((m["name"], m["fingerprint"]) for m in a["members"]),
        "base": a["base"] and [a["base"]["name"], a["base"]["fingerprint"]],
    }


def _merge(
    store: ArtifactStore,
    key: str,
    label: str,
    members: list[dict],
    method: str,
    params: dict,
    dtype: str | None = None,
    base: dict | None = None,
    tokenizer: str = "union",
) -> dict:
    """``members``: refs with name, uri, fingerprint and optional per-model ``params``."""
    inputs = [*members, *([base] if base else [])]
    sizes = config_vocab_sizes([m["uri"] for m in inputs])
    tokenizer = pipeline_tokenizer(tokenizer, [m["name"] for m in inputs], sizes)
    spec = merge_spec(members, method, params, dtype, base, tokenizer)
    fingerprints = _fingerprints(members, base)
    with store.writing(MODEL_KIND, key, meta={"stage": "merge", "label": label}) as tmp:
        out = Path(tmp) / "model"
        merge_to_directory(
            spec,
            out,
            input_fingerprints=fingerprints,
            card_extra={"model-glue key": key, "label": label},
        )
        for f in out.iterdir():
            shutil.move(str(f), str(Path(tmp) / f.name))
        out.rmdir()
    fp = fingerprint_checkpoint(str(store.local_path(MODEL_KIND, key)))
    return {
        "label": label,
        "artifact_id": key,
        "uri": store.uri(MODEL_KIND, key),
        "path": str(store.local_path(MODEL_KIND, key)),
        "method": method,
        "params": params,
        "spec": spec.to_config(),
        "members": [
            {"name": m.label, "fingerprint": fingerprints[m.label], "params": dict(m.params)}
            for m in spec.models
        ],
        **fp.to_dict(),
    }


def _lineage(call: Call, r: dict) -> Lineage:
    base = call.params.get("base")
    parents = tuple((m["fingerprint"], "member") for m in r["members"])
    if base is not None:  # a task-vector merge: its base is a parent too
        parents += ((base["fingerprint"], "base"),)
    return Lineage(
        artifacts=[
            Artifact(
                r["artifact_id"],
                kind="merged",
                name=call.label,
                uri=r["uri"],
                content_hash=r["fingerprint"],
                stage="merge",
                parents=parents,
            )
        ]
    )


STAGE = Stage(
    name="merge",
    compute=_merge,
    uses=ENGINE,
    not_in_key={"label": "the name on the model card; the spec names the members"},
    key_parts=_identity,
    lineage=_lineage,
    outputs=(MODEL_KIND,),
    pending=lambda c: {},
)

merge_cluster = STAGE.task()
