"""A plain uniform average of same-layout models.

Stand-in for the merge engine (``model_glue.merge.merge_in_memory``) where a mixture needs
"attention, embeddings and norms from a merged model" and the caller has no merged model yet.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from model_glue.mixture.layout import require_same_layout
from model_glue.mixture.loading import ModelSource, load_model, model_name


@torch.no_grad()
def uniform_average(sources: Sequence[ModelSource]) -> PreTrainedModel:
    """The model soup sum_i theta_i / n of ``sources`` (all of one architecture)."""
    models = [load_model(s, "expert") for s in sources]
    require_same_layout(models, [model_name(s, i) for i, s in enumerate(sources)])
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    for key, tensor in out.state_dict().items():
        tensor.copy_(torch.stack([s[key].float() for s in states]).mean(0).to(tensor.dtype))
    return out
