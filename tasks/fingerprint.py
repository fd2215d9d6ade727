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
from storage import ArtifactStore, Details, Lineage
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
    store: ArtifactStore,
    key: str,
    name: str,
    uri: str,
    sketch_k: int = 32,
    sketch_seed: int = 0,
    source: dict | None = None,
) -> dict:
    """``source``: where the directory came from, when not a directory of the user's: a
    hub repo (``repo``, ``revision``, ``commit``, ``files``: the hub's sha256 per file) or
    an adapter applied to a base (``adapter``, ``base``: their fingerprints)."""
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
    source = call.params.get("source") or {}
    origin = {
        "fingerprint": r["fingerprint"],
        "name": call.params["name"],
        "uri": call.params["uri"],
        "source": "adapter" if "adapter" in source else "hub" if "repo" in source else "path",
        "repo": source.get("repo"),
        "revision": source.get("revision"),
        "commit": source.get("commit"),  # the call's: a cached record may predate it
        "adapter_fingerprint": source.get("adapter"),
        "base_fingerprint": source.get("base"),
    }
    return Lineage(
        models=[
            {
                "fingerprint": r["fingerprint"],
                "name": call.params["name"],
                "uri": r["uri"],
                "bytes": r.get("bytes"),
                **model,
            }
        ],
        details=[Details("model_sources", [origin])],
    )


def _key_parts(a: dict) -> dict:
    """A directory is keyed on its stat signature: rehashed only when its files change. A
    hub snapshot is keyed on the hub's sha256 of each file instead: a new commit that
    changes no file (a README edit) is not hashed again, and no directory is walked."""
    source = a.get("source") or {}
    if "files" in source:
        hub = {k: source[k] for k in ("repo", "files")}
        return {"uri": {"hub": hub}, "source": {"repo": source["repo"]}}
    return {"uri": {"uri": a["uri"], "stat": _stat_or_missing(a["uri"])}}


STAGE = Stage(
    name="fingerprint",
    compute=_fingerprint,
    uses=FINGERPRINT,
    not_in_key={"name": "a label: the directory's content is what is hashed"},
    key_parts=_key_parts,
    lineage=_lineage,
    outputs=(SKETCH_KIND,),
)

fingerprint_model = STAGE.task(retries=0)
