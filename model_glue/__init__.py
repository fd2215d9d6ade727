"""model-glue: the Model-GLUE recipe (arXiv 2410.05357) as a reusable library.

This package is the plain numerics layer: checkpoints, fingerprints, similarity,
clustering, merging, search, mixtures, evaluation and the demo zoo. It imports neither
Prefect nor DuckDB; ``tasks/``, ``flows/`` and ``storage/`` build the pipeline on top.
"""

__version__ = "0.1.0"
