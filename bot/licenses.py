"""License aggregation: the parents' Hub license identifiers -> the merge's license, as a rule table.

A merge is a derivative of every parent, so it must honour all their terms at once:

================  ==========================================================================
kind              rule for the merge
================  ==========================================================================
permissive        the most restrictive permissive licence among the parents is used
                  (apache-2.0 > bsd-3-clause > bsd-2-clause > cc-by-4.0 > mit > cc0/unlicense),
                  with its attribution notice
share_alike       the result must use the same licence (two different share-alike licences,
                  or share-alike with a vendor licence, cannot both hold: refused)
noncommercial     the result is non-commercial (cc-by-nc-4.0, or cc-by-nc-sa-4.0 when a parent
                  is share-alike); with a vendor licence the vendor licence is kept and the
                  non-commercial restriction is listed as an obligation
no_derivatives    refused: the licence forbids making a merge at all
responsible_ai    OpenRAIL family: use restrictions carry over; the licence is kept
vendor            Llama, Gemma and similar: the licence carries over with its obligations
                  ("Built with Llama", name prefixes); two different vendor licences are refused
unknown           ``other``, ``unknown``, missing or unrecognised: needs ``--accept-license``
================  ==========================================================================

Gated parents make the result gated by default. :func:`decide` returns a frozen
:class:`LicenseVerdict` with every reason, so the bot's reply and the card say the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bot.markdown import code_span

Kind = Literal[
    "permissive", "share_alike", "noncommercial", "no_derivatives", "responsible_ai", "vendor", "unknown"
]


@dataclass(frozen=True)
class LicenseRule:
    """What one Hub license identifier means for a derivative."""

    kind: Kind
    name: str
    # among permissive licences, higher means more conditions to pass on
    rank: int = 0
    share_alike: bool = False
    obligations: tuple[str, ...] = ()
    # the derivative's name must start with this (case-insensitive), e.g. Llama 3.x
    name_prefix: str | None = None


_LLAMA3_OBLIGATIONS = (
    'Display "Built with Llama" on a related website, user interface, blog post, about page or product documentation.',
    "Keep the licence's Acceptable Use Policy and pass it on to users.",
    "Products with more than 700 million monthly active users need a separate licence from Meta.",
)

RULES: dict[str, LicenseRule] = {
    "apache-2.0": LicenseRule(
        "permissive",
        "Apache License 2.0",
        rank=50,
        obligations=(
            "Keep the Apache-2.0 licence text and any NOTICE file; state the changes made (this merge).",
        ),
    ),
    "bsd-3-clause": LicenseRule(
        "permissive",
        "BSD 3-Clause",
        rank=40,
        obligations=(
            "Keep the copyright notice and licence text; do not use the authors' names to endorse the merge.",
        ),
    ),
    "bsd-2-clause": LicenseRule(
        "permissive", "BSD 2-Clause", rank=30, obligations=("Keep the copyright notice and licence text.",)
    ),
    "bsd": LicenseRule(
        "permissive", "BSD", rank=30, obligations=("Keep the copyright notice and licence text.",)
    ),
    "cc-by-4.0": LicenseRule(
        "permissive",
        "Creative Commons Attribution 4.0",
        rank=25,
        obligations=("Credit the parents' authors and link to the licence.",),
    ),
    "mit": LicenseRule(
        "permissive", "MIT", rank=20, obligations=("Keep the copyright notice and licence text.",)
    ),
    "cc0-1.0": LicenseRule("permissive", "CC0 1.0", rank=1),
    "unlicense": LicenseRule("permissive", "The Unlicense", rank=1),
    "cc-by-sa-4.0": LicenseRule(
        "share_alike",
        "Creative Commons Attribution-ShareAlike 4.0",
        share_alike=True,
        obligations=("Credit the parents' authors; share the merge under CC-BY-SA-4.0.",),
    ),
    "gpl-3.0": LicenseRule(
        "share_alike",
        "GNU GPL v3",
        share_alike=True,
        obligations=("Distribute the merge under the GPL-3.0.",),
    ),
    "cc-by-nc-4.0": LicenseRule(
        "noncommercial",
        "Creative Commons Attribution-NonCommercial 4.0",
        obligations=("Non-commercial use only.", "Credit the parents' authors."),
    ),
    "cc-by-nc-sa-4.0": LicenseRule(
        "noncommercial",
        "Creative Commons Attribution-NonCommercial-ShareAlike 4.0",
        share_alike=True,
        obligations=("Non-commercial use only.", "Credit the parents' authors; share under CC-BY-NC-SA-4.0."),
    ),
    "cc-by-nd-4.0": LicenseRule("no_derivatives", "Creative Commons Attribution-NoDerivatives 4.0"),
    "cc-by-nc-nd-4.0": LicenseRule(
        "no_derivatives", "Creative Commons Attribution-NonCommercial-NoDerivatives 4.0"
    ),
    "openrail": LicenseRule(
        "responsible_ai",
        "OpenRAIL",
        obligations=("Pass on the licence's use restrictions (Attachment A) to every user of the merge.",),
    ),
    "openrail++": LicenseRule(
        "responsible_ai",
        "OpenRAIL++-M",
        obligations=("Pass on the licence's use restrictions to every user of the merge.",),
    ),
    "creativeml-openrail-m": LicenseRule(
        "responsible_ai",
        "CreativeML OpenRAIL-M",
        obligations=("Pass on the licence's use restrictions to every user of the merge.",),
    ),
    "bigscience-openrail-m": LicenseRule(
        "responsible_ai",
        "BigScience OpenRAIL-M",
        obligations=("Pass on the licence's use restrictions to every user of the merge.",),
    ),
    "llama2": LicenseRule(
        "vendor",
        "Llama 2 Community License",
        obligations=(
            "Distribute with a copy of the Llama 2 Community License and its Acceptable Use Policy.",
            "Products with more than 700 million monthly active users need a separate licence from Meta.",
        ),
    ),
    "llama3": LicenseRule(
        "vendor", "Meta Llama 3 Community License", obligations=_LLAMA3_OBLIGATIONS, name_prefix="Llama"
    ),
    "llama3.1": LicenseRule(
        "vendor", "Llama 3.1 Community License", obligations=_LLAMA3_OBLIGATIONS, name_prefix="Llama"
    ),
    "llama3.2": LicenseRule(
        "vendor", "Llama 3.2 Community License", obligations=_LLAMA3_OBLIGATIONS, name_prefix="Llama"
    ),
    "llama3.3": LicenseRule(
        "vendor", "Llama 3.3 Community License", obligations=_LLAMA3_OBLIGATIONS, name_prefix="Llama"
    ),
    "gemma": LicenseRule(
        "vendor",
        "Gemma Terms of Use",
        obligations=(
            'Include the notice "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms".',
            "Pass on the Gemma Prohibited Use Policy to every user of the merge.",
        ),
    ),
    "other": LicenseRule("unknown", "other"),
    "unknown": LicenseRule("unknown", "unknown"),
}

LICENSE_LINKS: dict[str, str] = {
    "llama2": "https://ai.meta.com/llama/license/",
    "llama3": "https://llama.meta.com/llama3/license/",
    "llama3.1": "https://llama.meta.com/llama3_1/license/",
    "llama3.2": "https://www.llama.com/llama3_2/license/",
    "llama3.3": "https://www.llama.com/llama3_3/license/",
    "gemma": "https://ai.google.dev/gemma/terms",
}


@dataclass(frozen=True)
class ParentLicense:
    """One parent's licence facts, as its card and the Hub report them."""

    repo_id: str
    license: str | None
    license_name: str | None = None
    license_link: str | None = None
    gated: bool = False


@dataclass(frozen=True)
class LicenseVerdict:
    """What the merge may be published under, and why.

    ``allowed`` is False when the merge must not be made; ``reasons`` then say why (and
    ``needs_acceptance`` says whether ``--accept-license`` would change that).
    """

    allowed: bool
    license: str
    license_name: str | None
    license_link: str | None
    commercial_use: bool
    gated: bool
    obligations: tuple[str, ...]
    reasons: tuple[str, ...]
    needs_acceptance: bool = False
    name_prefix: str | None = None


def rule_for(license_id: str | None) -> tuple[str, LicenseRule]:
    """The normalised identifier and its rule; anything unrecognised is ``unknown``."""
    key = (license_id or "unknown").strip().lower()
    return (key, RULES[key]) if key in RULES else (key, RULES["unknown"])


def _dedupe(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def decide(
    parents: Sequence[ParentLicense], *, accept_license: bool = False, model_name: str | None = None
) -> LicenseVerdict:
    """Aggregate the parents' licences into the merge's licence.

    Args:
        parents: every parent, base included.
        accept_license: the requester's ``--accept-license``: take responsibility for unknown terms.
        model_name: the result's repo name (without namespace), checked against naming rules.
    """
    ruled = [(p, *rule_for(p.license)) for p in parents]
    refusals: list[str] = []
    notes: list[str] = []
    obligations: list[str] = []
    gated = any(p.gated for p in parents)
    if gated:
        notes.append("A parent is gated, so the merge is gated too.")
    by_kind: dict[Kind, list[tuple[ParentLicense, str, LicenseRule]]] = {}
    for p, key, rule in ruled:
        by_kind.setdefault(rule.kind, []).append((p, key, rule))
        obligations.extend(rule.obligations)

    for p, key, _ in by_kind.get("no_derivatives", []):
        refusals.append(f"`{p.repo_id}` is licensed {key}, which forbids derivatives such as merges.")

    vendor_ids = sorted({key for _, key, _ in by_kind.get("vendor", [])})
    if len(vendor_ids) > 1:
        refusals.append(
            f"The parents carry different vendor licences ({', '.join(vendor_ids)}); a merge cannot satisfy both."
        )
    sa_ids = sorted({key for _, key, rule in ruled if rule.share_alike})
    sa_plain = [k for k in sa_ids if RULES[k].kind == "share_alike"]
    if len(sa_plain) > 1:
        refusals.append(f"The parents carry different share-alike licences ({', '.join(sa_plain)}).")
    if sa_ids and vendor_ids:
        refusals.append(
            f"Share-alike ({', '.join(sa_ids)}) and vendor ({', '.join(vendor_ids)}) licences cannot both hold."
        )

    unknown = by_kind.get("unknown", [])
    needs_acceptance = bool(unknown) and not accept_license
    if unknown:
        shown = ", ".join(f"`{p.repo_id}` ({code_span(p.license_name or key)})" for p, key, _ in unknown)
        if accept_license:
            notes.append(f"Unrecognised licences accepted by the requester: {shown}.")
            obligations.append("Follow the terms of every parent's own licence (see their cards).")
        else:
            refusals.append(
                f"These parents have licences the bot cannot check: {shown}. Read their terms and add "
                "`--accept-license` to the command if a merge is allowed."
            )

    commercial = "noncommercial" not in by_kind
    # Pick the one identifier the result is published under.
    license_name: str | None = None
    link: str | None = None
    if vendor_ids:
        result = vendor_ids[0]
        link = LICENSE_LINKS.get(result)
        if not commercial:
            notes.append("A parent is non-commercial, so the merge may not be used commercially.")
    elif "noncommercial" in by_kind:
        result = "cc-by-nc-sa-4.0" if sa_ids else "cc-by-nc-4.0"
        notes.append("A parent is non-commercial, so the merge is non-commercial.")
    elif sa_plain:
        result = sa_plain[0]
    elif by_kind.get("responsible_ai"):
        rail = sorted({key for _, key, _ in by_kind["responsible_ai"]})
        result = rail[0]
        if len(rail) > 1:
            notes.append(
                f"Several responsible-AI licences apply ({', '.join(rail)}); all their use restrictions hold."
            )
    elif unknown:
        result = "other"
        names = sorted({p.license_name or key for p, key, _ in unknown})
        license_name = names[0] if len(names) == 1 else "mixed"
        links = sorted({p.license_link for p, _, _ in unknown if p.license_link})
        link = links[0] if len(links) == 1 else None
    elif by_kind.get("permissive"):
        result = max((rule.rank, key) for _, key, rule in by_kind["permissive"])[1]
    else:
        result = "other"
        license_name = "unknown"
    if unknown and result != "other":
        notes.append("Some parents' licences are not recognised; their own terms also apply.")

    prefix = next((rule.name_prefix for _, _, rule in ruled if rule.name_prefix), None)
    if prefix and model_name is not None and not model_name.lower().startswith(prefix.lower()):
        refusals.append(
            f'The {result} licence requires the model name to start with "{prefix}"; '
            f"use for example `--name {prefix}-{model_name}`."
        )
    allowed = not refusals
    return LicenseVerdict(
        allowed=allowed,
        license=result,
        license_name=license_name,
        license_link=link,
        commercial_use=commercial,
        gated=gated,
        obligations=_dedupe(obligations),
        reasons=_dedupe([*refusals, *notes]),
        needs_acceptance=needs_acceptance and all("accept-license" in r for r in refusals),
        name_prefix=prefix,
    )
