"""How a merge method is declared: its parameters once, as data, and a pure tensor function.

Everything else (recipe validation, the CLI's help, later the Space form and the search
space) is derived from these declarations, so a method's parameters are listed once.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

ParamValue = float | bool | int | str


class Scope(enum.Enum):
    """Where a parameter may be set and who it applies to."""

    SHARED = "shared"  # one value per tensor: top-level or slice `parameters`
    INPUT = "input"  # one value per input model, the base included
    NON_BASE = "non_base"  # one value per input model, the base excluded


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method: type, default (None means required), allowed range, meaning."""

    name: str
    kind: Literal["float", "bool", "int"]
    scope: Scope
    default: ParamValue | None
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    @property
    def required(self) -> bool:
        return self.default is None

    def coerce(self, value: object) -> ParamValue:
        """Turn a YAML scalar into this parameter's type, or raise ValueError with the reason."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "false"}:
                return value.lower() == "true"
            if isinstance(value, int | float) and value in (0, 1):
                return bool(value)
            raise ValueError(f"expected true or false, got {value!r}")
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads `1e-3` as a string
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        if not math.isfinite(value):  # `"nan"` and `1e999` (strings in YAML 1.1) become floats above
            raise ValueError(f"expected a finite number, got {value!r}")
        if self.kind == "int":
            if float(value) != int(value):
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(value)
        return float(value)

    def check_range(self, value: ParamValue) -> str | None:
        """The reason a value is out of range, or None if it is fine."""
        if self.kind == "bool" or not isinstance(value, int | float):
            return None
        low, high = self.minimum, self.maximum
        if low is not None and (value <= low if self.exclusive_minimum else value < low):
            return f"must be {'greater than' if self.exclusive_minimum else 'at least'} {low}{self._range_hint()}"
        if high is not None and value > high:
            return f"must be at most {high}{self._range_hint()}"
        return None

    def _range_hint(self) -> str:
        low = "(" if self.exclusive_minimum else "["
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f" (allowed: {low}{lo}, {hi}])"


@dataclass(frozen=True)
class MergeCall:
    """Everything one output tensor's merge needs, already resolved to numbers.

    ``tensors`` are in the compute dtype (float32, or float64 when asked for), all with the
    same shape; for a method that ``streams``, they may also be read-only views of the files
    in their stored dtype, which the method widens slice by slice. ``out_dtype`` is the dtype
    the engine stores the result in: a method may return that directly (None: compute dtype). ``input_params[i]`` holds the per-model parameters of ``tensors[i]``; for the
    base it holds only INPUT-scope parameters. ``seeds[i]`` seeds any randomness applied to
    input ``i``, so results never depend on the order tensors are processed in.
    """

    tensors: Sequence[torch.Tensor]
    base_index: int | None
    params: Mapping[str, ParamValue]
    input_params: Sequence[Mapping[str, ParamValue]]
    seeds: Sequence[int]
    tensor_name: str = ""
    out_dtype: torch.dtype | None = None
    # a streaming method calls it with a flat range [start, end) it will not read again, so
    # the engine can drop those pages of the input files (a large tensor's inputs need not
    # all stay in memory until its end); None where there is nothing to drop
    release: Callable[[int, int], None] | None = None

    @property
    def base(self) -> torch.Tensor:
        if self.base_index is None:
            raise ValueError("this method needs a base model")
        return self.tensors[self.base_index]

    def others(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base_index]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as the registry knows it."""

    name: str
    pretty_name: str
    reference: str
    params: tuple[ParamSpec, ...]
    merge: Callable[[MergeCall], torch.Tensor]
    needs_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0  # inputs other than the base model, when there is one
    max_non_base: int | None = None
    randomized: bool = False
    # Each output element depends only on the same element of the inputs, so the engine may
    # merge a tensor slice by slice (exactly the same numbers, far less memory traffic).
    elementwise: bool = False
    # ``merge`` accepts the inputs as zero-copy views in their stored dtype (see MergeCall):
    # the engine then never reads whole inputs into float32 for it.
    streams: bool = False
    aliases: tuple[str, ...] = field(default=())

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def params_in(self, *scopes: Scope) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope in scopes)
