"""The one base class of the errors that a user's input explains completely.

A missing or truncated checkpoint, a pickle-only model, an unknown lm-eval task, a config
key out of range: each is reported as one line that names the model, file, task or key,
without a traceback. Any other exception is a bug or an environment problem and keeps its
traceback. The pipeline layer (``tasks/``, ``flows/``) decides how to show each kind by
this class alone.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, fully described by the message (which names what is wrong)."""
