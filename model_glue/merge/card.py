"""The README model card of a merged model: what was merged, how, and how to redo it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from model_glue.merge.plan import MergePlan
from model_glue.merge.spec import MergeSpec, dtype_name


def model_card(
    spec: MergeSpec,
    plan: MergePlan,
    fingerprints: Mapping[str, str],
    extra: Mapping[str, Any],
    engine_version: str,
) -> str:
    canonical = spec.canonical()
    front = {
        "library_name": "transformers",
        "tags": ["merge", "model-glue", plan.method.name],
        "base_model": [uri for _, uri in spec.inputs()],
    }
    rows = []
    for i, (name, uri) in enumerate(spec.inputs()):
        role = "base" if spec.base and i == 0 else "model"
        fp = fingerprints.get(name, fingerprints.get(uri, "-"))
        rows.append(f"| {name} | {role} | `{uri}` | `{fp}` |")
    params = json.dumps(canonical["params"], sort_keys=True)
    per_model = "\n".join(
        f"- {m['name']}: `{json.dumps(m['params'], sort_keys=True)}`" for m in canonical["models"]
    )
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Merged model ({plan.method.name})",
        "",
        f"Made with the model-glue merge engine ({engine_version}): {plan.method.summary} ({plan.method.reference}).",
        "",
        "## Inputs",
        "",
        "| name | role | location | fingerprint |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Parameters",
        "",
        f"- global: `{params}`",
        per_model,
        f"- output dtype: {dtype_name(plan.out_dtype)} (accumulated in float32)",
        _source_line(plan),
        f"- vocabulary: {plan.vocab.describe()}",
        "",
    ]
    if extra:
        lines += ["## Notes", ""] + [f"- {k}: {v}" for k, v in extra.items()] + [""]
    lines += [
        "## Reproduce",
        "",
        "`glue merge merge_config.yaml OUT` with this configuration (also saved as `merge_config.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(spec.to_config(), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _source_line(plan: MergePlan) -> str:
    reference = plan.input_names[plan.reference]
    vocabulary = plan.vocab.vocabulary
    if vocabulary is None:
        return f"- tokenizer and config from: {reference}"
    if vocabulary.files_from is not None:
        return f"- config from: {reference}; tokenizer files from: {vocabulary.names[vocabulary.files_from]}"
    return f"- config from: {reference}; tokenizer files: written for the merged vocabulary"
