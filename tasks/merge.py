"""Stage 3: merge each cluster's selected members into one Hugging Face model.

The merged model is content-addressed by (method, parameters, member fingerprints with
their per-model parameters, engine version): the same merge is never written twice, and a
changed member or parameter produces a new artifact beside the old one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from model_glue.fingerprint import fingerprint_checkpoint
from model_glue.merge import ENGINE_VERSION, MergeSpec, ModelInput, merge_to_directory
from storage import ArtifactStore
from tasks._stage import Stage, load_record, save_record

MODEL_KIND = "model"


def merge_spec(
    members: list[dict], method: str, params: dict, dtype: str | None, base: dict | None
) -> MergeSpec:
    """The engine's spec for a cluster merge; members in fingerprint order (listing order
    never matters). Raises the engine's error, naming the key, for bad parameters."""
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
    )


def _fingerprints(members: list[dict], base: dict | None) -> dict[str, str]:
    return {m["name"]: m["fingerprint"] for m in members} | (
        {base["name"]: base["fingerprint"]} if base else {}
    )


STAGE = Stage(
    name="merge",
    code_version=ENGINE_VERSION,
    # canonical spec (defaults filled in, names included: DARE seeds its masks by name) +
    # input fingerprints: the engine's own content address
    key_parts=lambda label, members, method, params, dtype, base: merge_spec(
        members, method, params, dtype, base
    ).content_key(_fingerprints(members, base)),
)


def _merge(
    store_url: str,
    label: str,
    members: list[dict],
    method: str,
    params: dict,
    dtype: str | None = None,
    base: dict | None = None,
) -> dict:
    """``members``: records with name, uri, fingerprint and optional per-model ``params``."""
    store = ArtifactStore(store_url)
    key = STAGE.key(
        {
            "label": label,
            "members": members,
            "method": method,
            "params": params,
            "dtype": dtype,
            "base": base,
        }
    )
    if (record := load_record(store, key)) is not None and store.exists(MODEL_KIND, key):
        return record
    spec = merge_spec(members, method, params, dtype, base)
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
    uri = store.uri(MODEL_KIND, key)
    fp = fingerprint_checkpoint(str(store.local_path(MODEL_KIND, key)))
    record = {
        "label": label,
        "artifact_id": key,
        "uri": uri,
        "method": method,
        "params": params,
        "spec": spec.to_config(),
        "members": [
            {"name": m.label, "fingerprint": fingerprints[m.label], "params": dict(m.params)}
            for m in spec.models
        ],
        **{k: v for k, v in fp.to_dict().items()},
    }
    return save_record(store, key, record, STAGE.name)


merge_cluster = STAGE.task(_merge)
