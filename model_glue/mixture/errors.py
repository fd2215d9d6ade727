"""The mixture package's error (importable without torch)."""

from model_glue.errors import InputError


class MixtureError(InputError):
    """A mixture cannot be built or loaded from the given models, prompts or directory."""
