"""The search's report: REPORT.md (best trials, baselines, held-out scores, trial cost) and a plot.

Rendering only: every number comes in a :class:`~engine.evolve.search.SearchResult`.
"""

from __future__ import annotations

import os
import statistics
from typing import TYPE_CHECKING

from engine.evolve.space import SearchSpace
from engine.evolve.spec import Evaluation, SearchSpec

if TYPE_CHECKING:
    from engine.evolve.search import SearchResult, TrialRecord

REPORT_FILE = "REPORT.md"
PLOT_FILE = "score_vs_trial.png"
TOP = 10


def write_report(result: SearchResult, space: SearchSpace, spec: SearchSpec) -> tuple[str, str]:
    """Write REPORT.md and score_vs_trial.png into ``result.out_dir``; returns their paths."""
    md = os.path.join(result.out_dir, REPORT_FILE)
    png = os.path.join(result.out_dir, PLOT_FILE)
    with open(md, "w", encoding="utf-8") as f:
        f.write(render_markdown(result, space, spec))
    plot_scores(result, png)
    return md, png


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _evaluated_on(evaluation: Evaluation) -> str:
    """What was scored: the data file, or lm-eval's tasks (from a task folder or lm-eval's own)."""
    if evaluation.kind == "lm_eval":
        tasks = ", ".join(f"`{t}`" for t in evaluation.tasks or ())
        return f"tasks {tasks}" + (f" from `{evaluation.data}`" if evaluation.data else "")
    return f"`{evaluation.data}`"


def render_markdown(result: SearchResult, space: SearchSpace, spec: SearchSpec) -> str:
    """The report as Markdown."""
    from engine.evolve.search import ranked_trials  # here: it is search that imports this module

    better = "lower" if result.direction == "minimize" else "higher"
    searched = [r for r in result.trials if r.baseline is None]
    baselines = list({r.baseline: r for r in reversed(result.trials) if r.baseline is not None}.values())[
        ::-1
    ]
    ev = spec.evaluation
    best_label = "best (`recipe.yml`)"
    if result.best.baseline:
        beaten = "chosen on the validation split" if result.validation else "no search trial beat it"
        best_label = f"best (`recipe.yml`): the {result.best.baseline} baseline, {beaten}"
    lines = [
        f"# Evolutionary merge search: {spec.method}",
        "",
        f"- models: {', '.join(f'`{m}`' for m in spec.models)} (base `{spec.base_model}`)",
        f"- evaluation: {ev.kind} on {_evaluated_on(ev)} ({result.metric}, {better} is better); "
        f"search split {ev.search_size}, held-out split {ev.report_size}"
        + (f", validation split {ev.validation_size}" if ev.validation_size else "")
        + f", split by seed {spec.seed}",
        f"- study `{result.study_name}` in `{result.storage}`: {len(searched)} search trials and "
        f"{len(baselines)} baselines completed",
        f"- search space: {len(space.dimensions)} dimensions ({', '.join(space.label(d) for d in space.dimensions)})",
        "",
        "## Held-out scores",
        "",
        "| recipe | trial | search split | held-out split |",
        "|---|---|---|---|",
        f"| {best_label} | {result.best.number} | {_fmt(result.best.score)} | {_fmt(result.held_out['best'])} |",
    ]
    for record in baselines:
        held = result.held_out.get(record.baseline or "")
        lines.append(
            f"| baseline: {record.baseline} | {record.number} | {_fmt(record.score)} | "
            f"{_fmt(held) if held is not None else 'n/a'} |"
        )
    lines += [
        "",
        f"The best recipe re-scored on the search split: {result.best_rescored!r} "
        f"(the trial reported {result.best.score!r}).",
        *_validation_lines(result),
        "",
        f"## Best trials (top {TOP}, search split)",
        "",
    ]
    header = ["rank", "trial", result.metric, *(space.label(d) for d in space.dimensions)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ranked = ranked_trials(result.trials, result.direction)[:TOP]
    for rank, record in enumerate(ranked, start=1):
        if record.baseline is not None:
            cells = [f"baseline: {record.baseline}"] + [""] * (len(space.dimensions) - 1)
        else:
            cells = [_fmt(float(record.params[d.key])) for d in space.dimensions]
        lines.append("| " + " | ".join([str(rank), str(record.number), _fmt(record.score), *cells]) + " |")
    lines += ["", "## Cost of a trial", "", *_cost_lines(result.trials), "", "## Best recipe", "", "```yaml"]
    lines += [result.best.recipe.rstrip(), "```", "", f"![score vs trial]({PLOT_FILE})", ""]
    return "\n".join(lines)


def _validation_lines(result: SearchResult) -> list[str]:
    """How the final recipe was chosen among the finalists, when a validation split was asked for."""
    if not result.validation:
        return []
    lines = [
        "",
        "## Choosing the final recipe",
        "",
        "The best search trials and the baselines, scored again on the validation split (items neither "
        "the search nor the held-out split uses); the best there is `recipe.yml`.",
        "",
        "| finalist | trial | search split | validation split | |",
        "|---|---|---|---|---|",
    ]
    for place, (record, value) in enumerate(result.finalists(), start=1):
        label = f"baseline: {record.baseline}" if record.baseline else str(record.number)
        chosen = "**chosen**" if record.number == result.best.number else ""
        lines.append(f"| {place} | {label} | {_fmt(record.score)} | {_fmt(value)} | {chosen} |")
    return lines


def _cost_lines(records: tuple[TrialRecord, ...]) -> list[str]:
    if not records:
        return ["no trials"]
    merge = statistics.median(r.merge_seconds for r in records)
    evaluate = statistics.median(r.eval_seconds for r in records)
    return [
        f"Median in-memory merge: {merge:.3f} s; median evaluation: {evaluate:.3f} s "
        f"(over {len(records)} trials, this machine)."
    ]


def plot_scores(result: SearchResult, path: str) -> None:
    """Score per trial, the best so far, and each baseline as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")  # no display; the application never shows a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    searched = [r for r in result.trials if r.baseline is None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if searched:
            xs = [r.number for r in searched]
            ys = [r.score for r in searched]
            ax.scatter(xs, ys, s=14, label="trial", color="tab:blue")
            best: list[float] = []
            for y in ys:
                best.append(y if not best else (min if result.direction == "minimize" else max)(best[-1], y))
            ax.step(xs, best, where="post", color="tab:green", label="best so far")
        for i, record in enumerate(r for r in result.trials if r.baseline is not None):
            ax.axhline(record.score, linestyle="--", color=f"C{3 + i}", label=f"baseline: {record.baseline}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{result.metric} (search split)")
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
