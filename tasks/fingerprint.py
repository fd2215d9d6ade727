"""Stage 0: fingerprint every zoo model (content hash + architecture signature).

The key is the directory's stat signature (file names, sizes, mtimes) plus its location:
an untouched directory is never rehashed, and any touched file triggers a real rehash.
Everything downstream is keyed on the resulting content fingerprint, not on this.

The same read makes the model's sketch (:mod:`model_glue.sketch`), stored beside the
record: similarity reads sketches, so a checkpoint is read once, here.
"""

from __future__ import annotations

from model_glue.fingerprint import fingerprint_and_sketch, stat_signature
from model_glue.sketch import SketchSettings, save_sketch, sketch_bytes
from storage import ArtifactStore, Lineage
from tasks.stage import Call, Stage
from tasks.versions import FINGERPRINT


def _stat_or_missing(uri: str) -> str:
    try:
        return stat_signature(uri)
    except FileNotFoundError:
        return "missing"  # the task body then fails with an error naming the model


SKETCH_KIND = "sketch"
SKETCH_FILE = "sketch.safetensors"


def _fingerprint(
    store: ArtifactStore, key: str, name: str, uri: str, sketch_k: int = 32, sketch_seed: int = 0
) -> dict:
    settings = SketchSettings(sketch_k, sketch_seed)
    fp, sketches = fingerprint_and_sketch(uri, settings)
    with store.writing(SKETCH_KIND, key, meta={"stage": "fingerprint"}) as tmp:
        save_sketch(sketches, tmp / SKETCH_FILE, settings)
    return {
        "name": name,
        "uri": uri,
        **fp.to_dict(),
        "sketch": key,
        "sketch_bytes": sketch_bytes(sketches.values()),
    }


def _lineage(call: Call, r: dict) -> Lineage:
    model = {k: r.get(k) for k in ("architecture", "arch_signature", "param_count", "dtype")}
    return Lineage(
        models=[
            {
                "fingerprint": r["fingerprint"],
                "name": call.params["name"],
                "uri": r["uri"],
                "bytes": r.get("bytes"),
                **model,
            }
        ]
    )


STAGE = Stage(
    name="fingerprint",
    compute=_fingerprint,
    uses=FINGERPRINT,
    not_in_key={"name": "a label: the directory's content is what is hashed"},
    # the directory and its stat signature: rehashed only when its files change
    key_parts=lambda a: {"uri": {"uri": a["uri"], "stat": _stat_or_missing(a["uri"])}},
    lineage=_lineage,
    outputs=(SKETCH_KIND,),
)

fingerprint_model = STAGE.task(retries=0)
