"""Stage 0: fingerprint every zoo model (content hash + architecture signature).

The key is the directory's stat signature (file names, sizes, mtimes) plus its location:
an untouched directory is never rehashed, and any touched file triggers a real rehash.
Everything downstream is keyed on the resulting content fingerprint, not on this.
"""

from __future__ import annotations

from model_glue.fingerprint import FINGERPRINT_VERSION, fingerprint_checkpoint, stat_signature
from storage import ArtifactStore
from tasks._stage import Stage, load_record, save_record

STAGE = Stage(
    name="fingerprint",
    # "-finite": records say which tensors hold NaN/Inf (the fingerprint itself is unchanged)
    code_version=f"fingerprint-{FINGERPRINT_VERSION}-finite",
    key_parts=lambda name, uri: {"uri": uri, "stat": _stat_or_missing(uri)},
)


def _stat_or_missing(uri: str) -> str:
    try:
        return stat_signature(uri)
    except FileNotFoundError:
        return "missing"  # the task body then fails with an error naming the model


def _fingerprint_model(store_url: str, name: str, uri: str) -> dict:
    store = ArtifactStore(store_url)
    key = STAGE.key({"name": name, "uri": uri})
    if (record := load_record(store, key)) is not None:
        return {**record, "name": name}
    fp = fingerprint_checkpoint(uri)
    return save_record(store, key, {"name": name, "uri": uri, **fp.to_dict()}, STAGE.name)


fingerprint_model = STAGE.task(_fingerprint_model, retries=0)
