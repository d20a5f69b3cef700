"""Compatibility audit: can these models be merged, judged from configs and headers alone."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import MergeConfig
from engine.errors import IncompatibleModelsError, MergeError
from engine.plan import ModelMeta, build_plan


@dataclass(frozen=True)
class ModelReport:
    """One row of the audit table."""

    model: str
    architecture: str
    layers: int
    hidden_size: int | None
    heads: int | None
    kv_heads: int | None
    vocab_size: int | None
    dtype: str
    parameters: int


@dataclass(frozen=True)
class Mismatch:
    field: str
    values: Mapping[str, Any]

    def __str__(self) -> str:
        shown = ", ".join(f"'{m}': {v}" for m, v in self.values.items())
        return f"{self.field} differs: {shown}"


@dataclass(frozen=True)
class Audit:
    reports: tuple[ModelReport, ...]
    mismatches: tuple[Mismatch, ...]
    plan_error: str | None

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.plan_error is None


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def report_for(meta: ModelMeta) -> ModelReport:
    cfg = _text_config(meta.config)
    arch = (meta.config.get("architectures") or [meta.config.get("model_type", "unknown")])[0]
    dtypes = Counter(info.dtype for info in meta.tensors.values())
    dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}.get(
        dtypes.most_common(1)[0][0] if dtypes else "", "unknown"
    )
    return ModelReport(
        model=meta.reference,
        architecture=str(arch),
        layers=meta.num_layers,
        hidden_size=cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model"),
        heads=cfg.get("num_attention_heads") or cfg.get("n_head"),
        kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg.get("vocab_size"),
        dtype=dtype,
        parameters=sum(info.numel for info in meta.tensors.values()),
    )


# Fields that must agree for any merge; layer counts only when whole models are merged.
_MUST_AGREE = ("architecture", "hidden_size", "heads", "kv_heads", "vocab_size")


def audit_models(
    config: MergeConfig, models: Mapping[str, ModelMeta], *, allow_crimes: bool = False
) -> Audit:
    """Compare the models a recipe names and try to plan the merge.

    ``allow_crimes`` (mergekit's flag) accepts differing architectures; shapes must still agree.
    """
    reports = tuple(report_for(models[ref]) for ref in config.referenced_models())
    fields: Sequence[str] = _MUST_AGREE if not allow_crimes else _MUST_AGREE[1:]
    if config.vocabulary_source is not None:
        # the vocabularies are merged by token, so their sizes may differ
        fields = tuple(f for f in fields if f != "vocab_size")
    if config.models:
        fields = (*fields, "layers")
    mismatches = []
    for name in fields:
        values = {r.model: getattr(r, name) for r in reports}
        if len({repr(v) for v in values.values()}) > 1:
            mismatches.append(Mismatch(name, values))
    plan_error = None
    try:
        build_plan(config, models)
    except MergeError as exc:
        plan_error = str(exc)
    return Audit(reports, tuple(mismatches), plan_error)


def raise_for_audit(audit: Audit) -> None:
    """Turn a failed audit into the error a merge would give."""
    if audit.mismatches:
        first = audit.mismatches[0]
        raise IncompatibleModelsError(
            f"The models are not compatible: {first}", models=list(first.values), field=first.field
        )
    if audit.plan_error:
        raise IncompatibleModelsError(audit.plan_error)
