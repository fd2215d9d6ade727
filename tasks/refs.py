"""Typed references to models as the flow passes them between stages.

A :class:`ModelRef` names a model (a zoo checkpoint, a merged model or a mixture) by its
content: stages key on ``fingerprint`` and record lineage against ``artifact_id`` (for a
zoo model, its fingerprint; for a store artifact, its key). At the task boundary it
becomes a plain dict (:func:`tasks.stage.plain`), which is what task bodies read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ModelRef:
    name: str
    uri: str  # where to read it: a local directory or an fsspec URL
    fingerprint: str
    artifact_id: str
    kind: str = "model"  # model (zoo) | merged | mixture
    dtype: str | None = None  # stored dtype, e.g. "BF16"
    arch_signature: str | None = None
    loader: str | None = None  # "mixture": evaluated through our lm-eval model class
    sketch: str | None = None  # zoo models: the store key of the model's sketch

    @classmethod
    def zoo(cls, record: dict, name: str) -> ModelRef:
        """A zoo model from its fingerprint record (``name``: the config's, which may
        differ from the one the stored record was made under)."""
        return cls(
            name=name,
            uri=record["uri"],
            fingerprint=record["fingerprint"],
            artifact_id=record["fingerprint"],
            dtype=record.get("dtype"),
            arch_signature=record.get("arch_signature"),
            sketch=record.get("sketch"),
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def renamed(self, name: str) -> ModelRef:
        return replace(self, name=name)


def by_fingerprint(refs: list[ModelRef]) -> list[ModelRef]:
    """Refs in fingerprint order: what stages key on never depends on listing order."""
    return sorted(refs, key=lambda r: r.fingerprint)
