"""A plain HTML page per repo, so links to ``<endpoint>/<org>/<name>`` open something readable.

The real Hub renders a rich page there; localhub shows what a person checking a merge needs:
the revision, licence and tags, the files (each linked to its download) and the README as text.
"""

from __future__ import annotations

from html import escape
from typing import Any


def repo_page(base_url: str, repo_id: str, info: dict[str, Any], readme: str | None) -> str:
    """The HTML page of one repo from its ``model_info`` view and README text."""
    card = info.get("cardData") or {}
    license_ = card.get("license", "unknown")
    tags = ", ".join(escape(str(t)) for t in info.get("tags", []))
    rows = []
    for sibling in info.get("siblings", []):
        name = str(sibling["rfilename"])
        size = sibling.get("size")
        href = f"{base_url}/{repo_id}/resolve/{info['sha']}/{name}"
        shown = f"{size:,} B" if isinstance(size, int) else ""
        rows.append(f'<tr><td><a href="{escape(href)}">{escape(name)}</a></td><td>{shown}</td></tr>')
    body = escape(readme) if readme else "(no README.md)"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(repo_id)} · localhub</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}td{{padding:.2rem .8rem;border-bottom:1px solid #ddd}}
pre{{background:#f6f6f6;padding:1rem;white-space:pre-wrap}}</style></head>
<body><h1>{escape(repo_id)}</h1>
<p>revision <code>{escape(str(info.get("sha", "")))}</code> · license <b>{escape(str(license_))}</b>
{" · private" if info.get("private") else ""}{" · gated" if info.get("gated") else ""}</p>
<p>tags: {tags or "none"}</p>
<h2>Files</h2><table>{"".join(rows)}</table>
<h2>README.md</h2><pre>{body}</pre>
</body></html>
"""
