"""The merge engine: every merge method of Model-GLUE, streaming and in memory.

- :func:`merge_to_directory`: stream safetensors inputs (local or fsspec) into a
  Hugging Face model directory with a model card; memory stays at a few tensors.
- :class:`Merger` / :func:`merge_in_memory`: merge resident state dicts (the search loop).
- :func:`load_merge_config`: our YAML or mergekit's; :func:`run_merge_file` is
  ``glue merge CONFIG OUT``.
- :data:`METHODS`: the registry; each method is one module under ``methods/``.
- :func:`build_vocabulary` / :func:`vocab_compatible`: merged vocabularies (``tokenizer:
  union | base | <model>``, mergekit's semantics) and the prefix-compatibility test.
"""

from model_glue.merge import methods as _methods  # noqa: F401  (registers the methods)
from model_glue.merge.config import load_merge_config, parse_merge_config
from model_glue.merge.engine import MergeResult, merge_to_directory
from model_glue.merge.memory import Merger, merge_in_memory
from model_glue.merge.params import MergeConfigError, Param
from model_glue.merge.plan import MergeInputError
from model_glue.merge.registry import METHODS, MergeMethod, get_method, methods_help
from model_glue.merge.run import run_merge_file
from model_glue.merge.spec import ENGINE_VERSION, MergeSpec, ModelInput
from model_glue.merge.tokenizer import MergedVocabulary, build_vocabulary, vocab_compatible

__all__ = [
    "ENGINE_VERSION",
    "METHODS",
    "MergeConfigError",
    "MergeInputError",
    "MergeMethod",
    "MergeResult",
    "MergedVocabulary",
    "MergeSpec",
    "Merger",
    "ModelInput",
    "Param",
    "build_vocabulary",
    "get_method",
    "load_merge_config",
    "merge_in_memory",
    "merge_to_directory",
    "methods_help",
    "parse_merge_config",
    "run_merge_file",
    "vocab_compatible",
]
