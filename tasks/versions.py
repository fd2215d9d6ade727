"""The code that changes results, as components that name what they call.

Bump a component's version when its numbers change (Prefect's TASK_SOURCE does not see
helper functions); every stage that uses it, directly or through another component, gets
new keys, and ``glue plan`` names the component that changed.
"""

from __future__ import annotations

from importlib.metadata import version

from model_glue.architectures.catalog import ARCHITECTURES_VERSION
from model_glue.clustering import CLUSTERING_VERSION
from model_glue.fingerprint import FINGERPRINT_VERSION
from model_glue.merge.spec import ENGINE_VERSION
from model_glue.similarity import SIMILARITY_VERSION
from model_glue.sketch import SKETCH_VERSION
from tasks.stage import Component

LM_EVAL = Component("lm-eval", version("lm-eval"))
# which tensor is which projection of which layer (model_glue.architectures)
ARCHITECTURES = Component("architectures", ARCHITECTURES_VERSION)
# the sketch the fingerprint stage stores (its matrices, which of them exact): the sketches
# of one group must all be of one version to compare
SKETCH = Component("sketch", SKETCH_VERSION, uses=(ARCHITECTURES,))
# "-finite": records say which tensors hold NaN/Inf (the fingerprint itself is unchanged);
# the layout check leaves out checkpoints whose tensors contradict their architecture
FINGERPRINT = Component(
    "fingerprint", f"{FINGERPRINT_VERSION}-finite", uses=(ARCHITECTURES, SKETCH)
)
SIMILARITY = Component("similarity", SIMILARITY_VERSION, uses=(ARCHITECTURES,))
CLUSTERING = Component("clustering", CLUSTERING_VERSION)
ENGINE = Component("merge-engine", ENGINE_VERSION, uses=(ARCHITECTURES,))
EVALUATION = Component("evaluation", "1", uses=(LM_EVAL,))
# the search merges through the engine and scores through lm-eval
SEARCH = Component("search", "1", uses=(ENGINE, EVALUATION))
# router accuracy runs lm-eval; "2": a linear router fitted on the selection's proxy labels
MIXTURE = Component("mixture", "2", uses=(EVALUATION, ARCHITECTURES))
# expert selection (cross-validated linear routing) and the final choice, on proxy scores
SELECTION = Component("selection", "1", uses=(EVALUATION,))
