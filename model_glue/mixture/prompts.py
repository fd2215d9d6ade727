"""Per-expert router prompts, as written in the run configuration.

The training-free routers of the paper describe each expert by a few prompts it should receive
(``positive``) and, optionally, prompts it should not (``negative``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from model_glue.mixture.errors import MixtureError


@dataclass(frozen=True)
class ExpertPrompts:
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


PromptsInput = Mapping[str, Mapping[str, Sequence[str]] | Sequence[str] | ExpertPrompts]


def parse_prompts(prompts: PromptsInput | None, expert_names: Sequence[str]) -> list[ExpertPrompts]:
    """Prompts in expert order; a list alone means positive prompts only.

    Errors name the expert and the key, because these come straight from a user's config.
    """
    if prompts is None:
        raise MixtureError(
            "router prompts are required for this router (prompts: {expert: {positive: [...]}})"
        )
    unknown = sorted(set(prompts) - set(expert_names))
    if unknown:
        raise MixtureError(
            f"prompts.{unknown[0]}: not an expert of this mixture (experts: {', '.join(expert_names)})"
        )
    out = []
    for name in expert_names:
        if name not in prompts:
            raise MixtureError(f"prompts.{name}: missing (every expert needs positive prompts)")
        entry = prompts[name]
        if isinstance(entry, ExpertPrompts):
            parsed = entry
        elif isinstance(entry, Mapping):
            extra = sorted(set(entry) - {"positive", "negative"})
            if extra:
                raise MixtureError(
                    f"prompts.{name}.{extra[0]}: unknown key (allowed: positive, negative)"
                )
            parsed = ExpertPrompts(
                tuple(entry.get("positive", ())), tuple(entry.get("negative", ()))
            )
        elif isinstance(entry, Sequence) and not isinstance(entry, str):
            parsed = ExpertPrompts(tuple(entry))
        else:
            raise MixtureError(
                f"prompts.{name}: expected a list of prompts or {{positive, negative}}"
            )
        if not parsed.positive:
            raise MixtureError(
                f"prompts.{name}.positive: empty (every expert needs at least one prompt)"
            )
        for key, texts in (("positive", parsed.positive), ("negative", parsed.negative)):
            if not all(isinstance(t, str) and t for t in texts):
                raise MixtureError(f"prompts.{name}.{key}: every prompt must be a non-empty string")
        out.append(parsed)
    return out
