"""Stage 0b: a PEFT LoRA adapter in the zoo, applied to its base as a full checkpoint.

Keyed on the adapter's content fingerprint and its base's: applied once, ever, and again
only when either changes. The result is a Hugging Face directory in the store, which the
fingerprint stage then fingerprints and sketches like any zoo model; lineage records the
adapter and its base as the adapted model's parents.
"""

from __future__ import annotations

from model_glue.adapters import adapter_fingerprint, apply_adapter
from storage import Artifact, ArtifactStore, Lineage
from tasks.stage import Call, Component, Stage
from tasks.versions import ENGINE

ADAPTER = Component("adapter", "1", uses=(ENGINE,))
MODEL_KIND = "model"


def _adapt(
    store: ArtifactStore, key: str, name: str, adapter: str, base: dict, allow_pickle: bool = False
) -> dict:
    """``adapter``: the adapter directory; ``base``: the base's ref (name, uri, fingerprint)."""
    with store.writing(MODEL_KIND, key, meta={"stage": "adapter", "label": name}) as tmp:
        summary = apply_adapter(adapter, base["uri"], tmp, allow_pickle=allow_pickle)
    fp = summary["adapter_fingerprint"]  # hashed once, by apply_adapter
    return {
        "name": name,
        "artifact_id": key,
        "uri": store.uri(MODEL_KIND, key),
        "path": str(store.local_path(MODEL_KIND, key)),
        "adapter": adapter,
        "adapter_fingerprint": fp,
        "base_fingerprint": base["fingerprint"],
        "summary": summary,
    }


def _lineage(call: Call, r: dict) -> Lineage:
    adapter = Artifact(
        r["adapter_fingerprint"],
        kind="adapter",
        name=f"{call.params['name']} (adapter)",
        uri=call.params["adapter"],
        content_hash=r["adapter_fingerprint"],
        stage="adapter",
    )
    adapted = Artifact(
        r["artifact_id"],
        kind="adapted",
        name=call.params["name"],
        uri=r["uri"],
        stage="adapter",
        parents=((r["adapter_fingerprint"], "adapter"), (r["base_fingerprint"], "base")),
    )
    return Lineage(artifacts=[adapter, adapted])


STAGE = Stage(
    name="adapter",
    compute=_adapt,
    uses=ADAPTER,
    not_in_key={
        "name": "a label: the adapter's content is what is keyed",
        "allow_pickle": "an opt-in to read the adapter's weights, not a change to them",
    },
    key_parts=lambda a: {
        "adapter": adapter_fingerprint(a["adapter"]),
        "base": a["base"]["fingerprint"],
    },
    lineage=_lineage,
    outputs=(MODEL_KIND,),
    pending=lambda c: {},
)

apply_lora = STAGE.task(retries=0)
