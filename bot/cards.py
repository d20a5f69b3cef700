"""Model cards for merges: metadata and body, rendered from ``model_card_templates/`` with no network I/O.

:func:`build_context` turns facts gathered beforehand (``bot.hub``: parents' revisions and
licences, the lineage) into a frozen :class:`CardContext`; :func:`render_card` only formats.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from bot.hub import Lineage, RepoFacts
from bot.licenses import LicenseVerdict
from bot.markdown import prose, web_link
from engine.quality import QualityReport

TEMPLATES = Path(__file__).resolve().parents[1] / "model_card_templates"
TEMPLATE_NAME = "merge.md.jinja"


@dataclass(frozen=True)
class ParentRow:
    repo_id: str
    sha: str
    license: str
    role: str  # "base" or "merged"
    weight: str = ""
    density: str = ""


@dataclass(frozen=True)
class TrialRow:
    """One of the best trials of an evolutionary search, as the card's table shows it."""

    rank: int
    trial: int
    score: str
    cells: tuple[str, ...]  # one per searched dimension; a baseline's first cell names it


@dataclass(frozen=True)
class SearchHistory:
    """What an evolved model's card tells about the search that found its recipe."""

    method: str
    metric: str
    better: str  # "lower" or "higher"
    evaluation: str  # e.g. "perplexity on hf://datasets/org/eval@sha/eval.txt"
    searched: int  # search trials completed
    baselines: int
    columns: tuple[str, ...]  # the searched dimensions ("weight ft-math", ...)
    rows: tuple[TrialRow, ...]  # the best trials, best first
    held_out: tuple[tuple[str, str, str], ...]  # (recipe, search-split score, held-out score), best first
    best_trial: int
    best_baseline: str | None = None  # the best recipe is this baseline
    plot: str | None = None  # a PNG in the repo: score against trial
    # with a validation split: (trial or baseline, search-split score, validation score) per finalist
    validation: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class CardContext:
    """Everything a card shows; built before rendering."""

    repo_id: str
    name: str
    method: str
    requester: str
    bot_name: str
    bot_url: str
    hub_url: str
    recipe_yaml: str
    parents: tuple[ParentRow, ...]
    lineage_nodes: tuple[tuple[str, str], ...]
    lineage_edges: tuple[tuple[str, str], ...]
    lineage_missing: tuple[str, ...]
    lineage_truncated: bool
    license: str
    license_name: str | None
    license_link: str | None
    commercial_use: bool
    gated: bool
    license_reasons: tuple[str, ...]
    obligations: tuple[str, ...]
    job_id: str
    evaluations: tuple[tuple[str, float], ...] = ()
    search: SearchHistory | None = None  # set for a model found by `evolve`
    quality: QualityReport | None = None  # the merge's quality check (engine.quality)
    anatomy: bool = False  # the repo holds merge_anatomy.png and merge_report.json (engine.anatomy)

    @property
    def license_display(self) -> str:
        return (
            f"{self.license_name} (other)" if self.license == "other" and self.license_name else self.license
        )

    @property
    def fence(self) -> str:
        longest = max((len(m) for m in re.findall(r"`+", self.recipe_yaml)), default=0)
        return "`" * max(3, longest + 1)


def _param(params: Any, key: str) -> str:
    if not isinstance(params, Mapping) or key not in params:
        return ""
    value = params[key]
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _strip_revision(reference: str) -> str:
    return reference.partition("@")[0]


def parent_rows(recipe_yaml: str, facts: Mapping[str, RepoFacts]) -> tuple[ParentRow, ...]:
    """One row per parent (base first), with its role and its weight/density as written in the recipe.

    ``facts`` is keyed by repo id (without revision).
    """
    data = yaml.safe_load(recipe_yaml) or {}
    base = _strip_revision(str(data["base_model"])) if data.get("base_model") else None
    params: dict[str, tuple[str, str]] = {}
    for m in data.get("models") or []:
        params.setdefault(
            _strip_revision(str(m.get("model"))),
            (_param(m.get("parameters"), "weight"), _param(m.get("parameters"), "density")),
        )
    for s in data.get("slices") or []:
        for src in s.get("sources") or []:
            params.setdefault(
                _strip_revision(str(src.get("model"))),
                (_param(src.get("parameters"), "weight"), _param(src.get("parameters"), "density")),
            )
    rows = []
    for repo_id, f in facts.items():
        weight, density = params.get(repo_id, ("", ""))
        rows.append(
            ParentRow(
                repo_id,
                f.sha,
                f.license or "unknown",
                "base" if repo_id == base else "merged",
                weight,
                density,
            )
        )
    rows.sort(key=lambda r: r.role != "base")
    return tuple(rows)


def _label(text: str) -> str:
    return re.sub(r"[\"<>`\[\]{}|]", "", text)


def lineage_graph(
    result: str, lineage: Lineage
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Mermaid nodes (id, label) and edges (child id, parent id): the result, its parents, their ancestors."""
    ids: dict[str, str] = {result: "n0"}
    nodes: list[tuple[str, str]] = [("n0", _label(result))]

    def node(repo: str, license_: str | None) -> str:
        if repo not in ids:
            ids[repo] = f"n{len(ids)}"
            suffix = f" ({license_})" if license_ else ""
            nodes.append((ids[repo], _label(repo + suffix)))
        return ids[repo]

    known = {n.repo_id: n for n in lineage.nodes}
    edges: list[tuple[str, str]] = []
    for root in lineage.roots:
        edges.append(("n0", node(root, known[root].license if root in known else None)))
    for n in lineage.nodes:
        child = node(n.repo_id, n.license)
        for parent in n.parents:
            parent_node = known.get(parent)
            edges.append((child, node(parent, parent_node.license if parent_node else None)))
    missing = tuple(n.repo_id for n in lineage.nodes if n.missing)
    return tuple(nodes), tuple(dict.fromkeys(edges)), missing


def build_context(
    *,
    repo_id: str,
    requester: str,
    bot_name: str,
    hub_url: str,
    method: str,
    recipe_yaml: str,
    facts: Mapping[str, RepoFacts],
    lineage: Lineage,
    verdict: LicenseVerdict,
    job_id: str,
    evaluations: Sequence[tuple[str, float]] = (),
    search: SearchHistory | None = None,
    quality: QualityReport | None = None,
    anatomy: bool = False,
) -> CardContext:
    """Assemble a card's context from facts already gathered (no I/O)."""
    nodes, edges, missing = lineage_graph(repo_id, lineage)
    return CardContext(
        repo_id=repo_id,
        name=repo_id.split("/")[-1],
        method=method,
        requester=requester,
        bot_name=bot_name,
        bot_url=f"{hub_url}/{bot_name}",
        hub_url=hub_url,
        recipe_yaml=recipe_yaml,
        parents=parent_rows(recipe_yaml, facts),
        lineage_nodes=nodes,
        lineage_edges=edges,
        lineage_missing=missing,
        lineage_truncated=lineage.truncated,
        license=verdict.license,
        license_name=verdict.license_name,
        license_link=web_link(verdict.license_link),
        commercial_use=verdict.commercial_use,
        gated=verdict.gated,
        license_reasons=verdict.reasons,
        obligations=verdict.obligations,
        job_id=job_id,
        evaluations=tuple(evaluations),
        search=search,
        quality=quality,
        anatomy=anatomy,
    )


def quality_results(ctx: CardContext) -> list[EvalResult]:
    """The quality check's perplexity as a ``model-index`` entry (none if it was skipped or not finite)."""
    report = ctx.quality
    if report is None or report.merge is None or not math.isfinite(report.merge.perplexity):
        return []
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type="mergebot-quality-text",
            dataset_name=report.text,
            metric_type="perplexity",
            metric_name="perplexity",
            metric_value=round(report.merge.perplexity, 3),
        )
    ]


def card_metadata(ctx: CardContext) -> ModelCardData:
    """The card's YAML front matter, in the Hub's field names."""
    extra: dict[str, Any] = {}
    if ctx.license == "other":
        extra["license_name"] = (
            re.sub(r"[^a-z0-9.-]+", "-", (ctx.license_name or "other").lower()).strip("-") or "other"
        )
        # The Hub refuses `other` without a link: with none of its own, point to the parents' terms.
        unknown = [p.repo_id for p in ctx.parents if p.license in ("other", "unknown", None)]
        fallback = f"{ctx.hub_url}/{(unknown or [p.repo_id for p in ctx.parents] or [ctx.repo_id])[0]}"
        extra["license_link"] = ctx.license_link or fallback
    elif ctx.license_link:
        extra["license_link"] = ctx.license_link
    results = quality_results(ctx)
    if results:
        extra |= {"model_name": ctx.name, "eval_results": results}
    return ModelCardData(
        base_model=[p.repo_id for p in ctx.parents],
        base_model_relation="merge",
        library_name="transformers",
        license=ctx.license,
        tags=["merge", "mergekit", "mergebot", ctx.method, *(["evolutionary-merge"] if ctx.search else [])],
        **extra,
    )


def _cell(value: object) -> str:
    text = str(value) if value not in (None, "") else "–"
    return text.replace("|", "\\|").replace("\n", " ")


def render_card(ctx: CardContext, templates: Path = TEMPLATES) -> str:
    """The README.md text; parsed back by ``huggingface_hub.ModelCard`` to catch malformed metadata."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # markdown, not HTML; table cells are escaped by the `cell` filter
        keep_trailing_newline=True,
    )
    env.filters["cell"] = _cell
    env.filters["prose"] = prose
    body = env.get_template(TEMPLATE_NAME).render(ctx=ctx)
    text = f"---\n{card_metadata(ctx).to_yaml()}\n---\n\n{body}"
    ModelCard(text, ignore_metadata_errors=False)
    return text
