"""The licence rule table, one rule per test."""

from __future__ import annotations

import pytest

from bot.licenses import RULES, ParentLicense, decide, rule_for


def parents(*licenses: str | None, gated: bool = False) -> list[ParentLicense]:
    return [ParentLicense(f"org/m{i}", lic, gated=gated and i == 0) for i, lic in enumerate(licenses)]


@pytest.mark.parametrize(
    ("licenses", "expected"),
    [
        (("mit", "mit"), "mit"),
        (("mit", "apache-2.0"), "apache-2.0"),
        (("bsd-2-clause", "mit"), "bsd-2-clause"),
        (("bsd-3-clause", "bsd-2-clause", "cc-by-4.0"), "bsd-3-clause"),
        (("cc0-1.0", "mit"), "mit"),
    ],
)
def test_permissive_parents_give_the_most_restrictive_permissive_licence(
    licenses: tuple[str, ...], expected: str
) -> None:
    verdict = decide(parents(*licenses))
    assert verdict.allowed and verdict.license == expected and verdict.commercial_use
    assert not verdict.gated


def test_a_non_commercial_parent_makes_the_merge_non_commercial() -> None:
    verdict = decide(parents("apache-2.0", "cc-by-nc-4.0"))
    assert verdict.allowed and verdict.license == "cc-by-nc-4.0" and not verdict.commercial_use
    assert "Non-commercial use only." in verdict.obligations
    assert decide(parents("cc-by-sa-4.0", "cc-by-nc-4.0")).license == "cc-by-nc-sa-4.0"


def test_share_alike_carries_over() -> None:
    assert decide(parents("mit", "cc-by-sa-4.0")).license == "cc-by-sa-4.0"
    assert not decide(parents("gpl-3.0", "cc-by-sa-4.0")).allowed


def test_no_derivatives_is_refused() -> None:
    verdict = decide(parents("mit", "cc-by-nd-4.0"))
    assert not verdict.allowed and not verdict.needs_acceptance
    assert any("forbids derivatives" in r for r in verdict.reasons)
    assert not decide(parents("cc-by-nd-4.0"), accept_license=True).allowed  # acceptance does not help


def test_vendor_licences_carry_over_with_their_obligations_and_naming_rule() -> None:
    verdict = decide(parents("apache-2.0", "llama3.1"), model_name="Llama-3.1-my-merge")
    assert verdict.allowed and verdict.license == "llama3.1" and verdict.name_prefix == "Llama"
    assert any("Built with Llama" in o for o in verdict.obligations)
    assert verdict.license_link and "llama" in verdict.license_link
    refused = decide(parents("llama3.2", "mit"), model_name="my-merge")
    assert not refused.allowed and any("--name Llama-my-merge" in r for r in refused.reasons)
    assert decide(parents("llama2", "mit"), model_name="my-merge").allowed  # Llama 2 has no naming rule
    gemma = decide(parents("gemma", "mit"))
    assert gemma.license == "gemma" and any("Gemma Terms of Use" in o for o in gemma.obligations)


def test_mixing_two_vendor_licences_is_flagged() -> None:
    verdict = decide(parents("llama3", "gemma"), model_name="Llama-x")
    assert not verdict.allowed and any("different vendor licences" in r for r in verdict.reasons)
    assert not decide(parents("llama2", "llama3"), model_name="Llama-x").allowed


def test_vendor_with_non_commercial_keeps_both() -> None:
    verdict = decide(parents("gemma", "cc-by-nc-4.0"))
    assert verdict.allowed and verdict.license == "gemma" and not verdict.commercial_use


def test_unknown_and_other_need_acceptance() -> None:
    for lic in ("other", "unknown", None, "some-new-license"):
        verdict = decide(
            [ParentLicense("org/a", "mit"), ParentLicense("org/b", lic, license_name="my-terms")]
        )
        assert not verdict.allowed and verdict.needs_acceptance, lic
        accepted = decide(
            [ParentLicense("org/a", "mit"), ParentLicense("org/b", lic, license_name="my-terms")],
            accept_license=True,
        )
        assert accepted.allowed and accepted.license == "other" and accepted.license_name == "my-terms"
    assert rule_for("Other")[0] == "other"


def test_gated_parents_make_the_result_gated() -> None:
    verdict = decide(parents("mit", "apache-2.0", gated=True))
    assert verdict.gated and any("gated" in r for r in verdict.reasons)


def test_responsible_ai_licences_carry_over() -> None:
    verdict = decide(parents("openrail", "mit"))
    assert verdict.allowed and verdict.license == "openrail"
    assert any("use restrictions" in o for o in verdict.obligations)


def test_every_rule_has_a_name_and_kind() -> None:
    for key, rule in RULES.items():
        assert key == key.lower() and rule.name and rule.kind
