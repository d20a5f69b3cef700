"""The merge's anatomy as a picture: parents' shares per layer, sign conflict and dropped share below.

Drawn with matplotlib's Agg backend (no display needed), from the report of
:meth:`engine.anatomy.Anatomy.report`, so a report read back from JSON draws the same plot.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any


def _import_matplotlib() -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.backends.backend_agg
    import matplotlib.figure


def preload() -> None:
    """Import matplotlib in a background thread, while the merge runs (it takes seconds on a busy machine).

    :func:`plot_report` then finds it imported, or waits on Python's import lock for this thread.
    """
    threading.Thread(target=_import_matplotlib, name="mergebot-preload-matplotlib", daemon=True).start()


def _short(name: str) -> str:
    """A model's name as a legend shows it: the last part of its path or repo id."""
    return os.path.basename(name.rstrip("/")) or name


def plot_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw ``report`` into the PNG file ``path``.

    Top panel: one stacked bar per layer (embeddings, layers by index, head, other), each
    parent's share in its colour. Bottom panel: sign conflict and dropped share per layer,
    where the report has them.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = report["layers"]
    labels = [row["layer"] for row in rows]
    positions = list(range(len(rows)))
    parents = list(report["parents"])
    figure = Figure(figsize=(max(8.0, 0.35 * len(rows) + 3.0), 7.0), dpi=100)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colours = matplotlib.colormaps["tab10"]
    floor = [0.0] * len(rows)
    for k, parent in enumerate(parents):
        shares = [float(row["shares"].get(parent, 0.0)) for row in rows]
        top.bar(positions, shares, bottom=floor, color=colours(k % 10), label=_short(parent), width=0.85)
        floor = [f + s for f, s in zip(floor, shares, strict=True)]
    what = "task vector norm" if report["kind"] == "task_vector" else "weight x distance from the merge"
    top.set_ylabel(f"share of the change\n({what})")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", title="parents")
    drew = False
    if any(row["sign_conflict"] is not None for row in rows):
        conflict = [row["sign_conflict"] or 0.0 for row in rows]
        bottom.plot(positions, conflict, marker="o", color="tab:red", label="sign conflict")
        drew = True
    if any(row["dropped"] is not None for row in rows):
        dropped = [row["dropped"] or 0.0 for row in rows]
        kind = f" ({report['dropped_kind']})" if report.get("dropped_kind") else ""
        bottom.plot(positions, dropped, marker="s", color="tab:grey", label=f"dropped{kind}")
        drew = True
    if drew:
        bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    else:
        bottom.text(
            0.5,
            0.5,
            "no sign conflict or dropping for this method",
            ha="center",
            va="center",
            transform=bottom.transAxes,
        )
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("share of entries")
    bottom.set_xlabel("layer")
    bottom.set_xticks(positions, labels, rotation=90 if len(rows) > 30 else 0, fontsize="small")
    names = ", ".join(_short(p) for p in parents)
    base = f" onto {_short(report['base_model'])}" if report.get("base_model") else ""
    figure.suptitle(f"{report['method']} merge anatomy: {names}{base}")
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
