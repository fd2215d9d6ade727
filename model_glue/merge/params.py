"""Merge parameters: declarations, and their resolution for one tensor.

A method declares each parameter once (:class:`Param`): its type, whether it is set per
model or globally, its default and its allowed range. Validation, ``glue merge --help``
text and ``docs/merging.md`` tables are all derived from these declarations.

A parameter *setting* written by a user may vary per tensor, with the same grammar as
mergekit so that its configs carry over:

- a scalar (``0.5``): the same value for every tensor;
- a list of numbers (``[0.2, 0.5, 0.8]``): a gradient over depth, linearly interpolated
  at ``t = layer / (num_layers - 1)``; tensors outside the decoder layers (embeddings,
  final norm, lm_head) take ``t = 0``, as in mergekit;
- a list of ``{filter: substring, value: setting}``: the first entry whose filter is a
  substring of the tensor name wins; an entry without filter (or ``"*"``) matches all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model_glue.errors import InputError

REQUIRED: Any = object()  # sentinel: the parameter has no default

Setting = Any  # scalar | list[scalar] | list[{"filter": str, "value": Setting}]


class MergeConfigError(InputError):
    """A merge configuration names an unknown method, parameter or value."""


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``per_model`` parameters are set on each input model (a global setting serves as the
    default for every model); the others are set once for the merge.
    """

    name: str
    type: type
    per_model: bool
    default: Any = REQUIRED
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    aliases: Mapping[Any, Any] | None = None  # accepted spellings, e.g. {True: "inverse_density"}

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, where: str) -> Any:
        """Check one resolved scalar; ``where`` names the config location for errors."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise MergeConfigError(f"{where}: {self.name} must be true or false, got {value!r}")
            return value
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise MergeConfigError(f"{where}: {self.name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise MergeConfigError(f"{where}: {self.name} must be finite, got {value!r}")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MergeConfigError(f"{where}: {self.name} must be an integer, got {value!r}")
        elif self.type is str:
            if self.aliases is not None and isinstance(value, bool | str) and value in self.aliases:
                value = self.aliases[value]
            if not isinstance(value, str):
                raise MergeConfigError(f"{where}: {self.name} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise MergeConfigError(f"{where}: {self.name}={value!r} is not one of {allowed}")
        if self.minimum is not None and value < self.minimum:
            raise MergeConfigError(
                f"{where}: {self.name}={value} is below its minimum {self.minimum}"
            )
        if self.maximum is not None and value > self.maximum:
            raise MergeConfigError(
                f"{where}: {self.name}={value} is above its maximum {self.maximum}"
            )
        return value

    def describe(self) -> str:
        scope = "per model" if self.per_model else "global"
        default = "required" if self.required else f"default {self.default!r}"
        bounds = ""
        if self.minimum is not None or self.maximum is not None:
            bounds = f", range [{self.minimum}, {self.maximum}]"
        if self.choices is not None:
            bounds = ", one of " + "/".join(str(c) for c in self.choices)
        return f"{self.name} ({self.type.__name__}, {scope}, {default}{bounds}): {self.help}"


def depth_position(layer: int | None, num_layers: int) -> float:
    """``t`` in [0, 1] for gradients: layer / (num_layers - 1); 0 outside the layers
    (``layer`` None: the tensor's layout puts it outside the decoder layers)."""
    i = layer
    if i is None or num_layers <= 1:
        return 0.0
    return min(1.0, i / (num_layers - 1))


def _is_scalar(x: Any) -> bool:
    return isinstance(x, bool | int | float | str)


def check_setting(param: Param, setting: Setting, where: str) -> None:
    """Validate a setting's shape and every scalar in it, once, at configuration time."""
    if _is_scalar(setting):
        param.coerce(setting, where)
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, Sequence) and setting:
        if all(_is_scalar(e) for e in setting):
            for e in setting:
                param.coerce(e, where)
            return
        for entry in setting:
            if not isinstance(entry, Mapping) or "value" not in entry:
                raise MergeConfigError(
                    f"{where}: {param.name} must be a value, a list of values (gradient) "
                    f"or a list of {{filter, value}} entries; got {setting!r}"
                )
            unknown = set(entry) - {"filter", "value"}
            if unknown:
                raise MergeConfigError(
                    f"{where}: {param.name} entry has unknown keys {sorted(unknown)}"
                )
            check_setting(param, entry["value"], where)
        return
    raise MergeConfigError(f"{where}: {param.name} has an invalid setting {setting!r}")


def resolve_setting(param: Param, setting: Setting, tensor_name: str, t: float) -> Any:
    """Value of a (pre-validated) setting for one tensor; None when no filter matched."""
    if _is_scalar(setting):
        return param.coerce(setting, tensor_name)
    if isinstance(setting, Mapping):
        setting = [setting]
    if all(_is_scalar(e) for e in setting):
        numeric = param.type in (float, int)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        value = (1 - frac) * setting[i0] + frac * setting[i1]
        return param.coerce(value if param.type is float else round(value), tensor_name)
    for entry in setting:
        f = entry.get("filter")
        if f is None or f == "*" or f in tensor_name:
            return resolve_setting(param, entry["value"], tensor_name, t)
    return None


def resolve(
    param: Param, settings: Sequence[Setting | None], tensor_name: str, t: float, who: str
) -> Any:
    """First setting (highest precedence first) that yields a value, else the default."""
    for s in settings:
        if s is not None:
            v = resolve_setting(param, s, tensor_name, t)
            if v is not None:
                return v
    if param.required:
        raise MergeConfigError(
            f"{who}: missing required parameter {param.name!r} for tensor {tensor_name!r}"
        )
    return param.default
