"""Cards render offline from a frozen context, and huggingface_hub parses what they say."""

from __future__ import annotations

import socket

import pytest
from huggingface_hub import ModelCard

from bot.cards import build_context, lineage_graph, render_card
from bot.hub import Lineage, LineageNode, RepoFacts
from bot.licenses import ParentLicense, decide
from engine.quality import Generation, ModelQuality, QualityReport, judge

RECIPE = (
    "merge_method: dare_ties\nbase_model: org/base@aaa\nmodels:\n"
    "  - model: org/a@bbb\n    parameters: {weight: [0.2, 0.8], density: 0.5}\n"
    "  - model: org/b@ccc\n    parameters: {weight: 0.5}\n"
)
FACTS = {
    "org/base": RepoFacts("org/base", "a" * 40, license="apache-2.0"),
    "org/a": RepoFacts("org/a", "b" * 40, license="mit", base_models=("org/base",)),
    "org/b": RepoFacts("org/b", "c" * 40, license="other", license_name="Weird | terms"),
}
LINEAGE = Lineage(
    roots=("org/base", "org/a", "org/b"),
    nodes=(
        LineageNode("org/base", "apache-2.0", ("org/root",)),
        LineageNode("org/a", "mit", ("org/base",)),
        LineageNode("org/b", "other", ("org/b-parent",)),
        LineageNode("org/root", None, ("org/a",)),  # a cycle: root claims to descend from a
        LineageNode("org/b-parent", None, (), missing=True),
    ),
    truncated=True,
)


def context(**kw: object):  # type: ignore[no-untyped-def]
    verdict = decide(
        [ParentLicense(f.repo_id, f.license, f.license_name) for f in FACTS.values()], accept_license=True
    )
    args = dict(
        repo_id="bot/result",
        requester="alice",
        bot_name="bot",
        hub_url="https://hub.example",
        method="dare_ties",
        recipe_yaml=RECIPE,
        facts=FACTS,
        lineage=LINEAGE,
        verdict=verdict,
        job_id="j1",
    )
    args.update(kw)
    return build_context(**args)  # type: ignore[arg-type]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("rendering must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_card_metadata_parses_and_lists_every_parent(no_network: None) -> None:
    text = render_card(context(evaluations=[("arc | easy", 0.5)]))
    card = ModelCard(text)
    assert card.data.base_model == ["org/base", "org/a", "org/b"]  # base first
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mergekit", "mergebot", "dare_ties"]
    assert card.data.license == "other"
    assert card.data.to_dict()["license_name"] == "weird-terms"
    assert "| [org/a](https://hub.example/org/a) | `bbbbbbbbbbbb` | mit | merged | [0.2, 0.8] | 0.5 |" in text
    assert "| base |" in text
    assert "## Evaluation" in text and "arc \\| easy" in text
    assert 'AutoModelForCausalLM.from_pretrained("bot/result")' in text
    assert "Older generations are not shown." in text
    assert "Not readable on the Hub (shown, not followed): org/b-parent." in text


def test_lineage_graph_is_safe_with_cycles() -> None:
    nodes, edges, missing = lineage_graph("bot/result", LINEAGE)
    labels = dict(nodes)
    ids = {label.split(" ")[0]: node for node, label in nodes}
    assert len(nodes) == len(set(labels)) == 6
    assert (ids["org/root"], ids["org/a"]) in edges and (ids["org/base"], ids["org/root"]) in edges
    assert missing == ("org/b-parent",)


def test_recipe_with_backticks_keeps_its_fence() -> None:
    recipe = RECIPE + "chat_template: '```{{ x }}```'\n"
    text = render_card(context(recipe_yaml=recipe))
    assert "````yaml" in text
    ModelCard(text)


def test_non_commercial_card_says_so() -> None:
    facts = {"org/base": RepoFacts("org/base", "a" * 40, license="cc-by-nc-4.0")}
    verdict = decide([ParentLicense("org/base", "cc-by-nc-4.0")])
    text = render_card(
        context(
            facts=facts,
            verdict=verdict,
            lineage=Lineage(roots=("org/base",)),
            recipe_yaml="merge_method: linear\nmodels:\n  - model: org/base@a\n",
        )
    )
    assert "non-commercial use only" in text and ModelCard(text).data.license == "cc-by-nc-4.0"
    assert "n0 --> n1" in text and 'n1["org/base"]' in text


def figures(ppl: float, name: str) -> ModelQuality:
    return ModelQuality(name, ppl, 2048, (Generation("p", "fine text"),))


def test_the_quality_check_goes_into_the_text_and_the_model_index(no_network: None) -> None:
    report = judge(figures(12.3456, "merge"), [figures(11.0, "org/a@bbb"), figures(40.0, "org/b@ccc")])
    text = render_card(context(quality=report))
    card = ModelCard(text, ignore_metadata_errors=False)
    (result,) = card.data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == (
        "text-generation",
        "perplexity",
        12.346,
    )
    assert result.dataset_name == "mergebot quality text" and card.data.model_name == "result"
    assert "## Quality check" in text and "**passed**" in text
    assert "| this merge | 12.35 | 0 |" in text and "| `org/a@bbb` | 11.00 | 0 |" in text
    assert "despite the failed check" not in text


def test_a_forced_failed_or_skipped_check_is_shown_without_a_model_index() -> None:
    failed = judge(figures(float("inf"), "merge"), [figures(11.0, "org/a@bbb")])
    text = render_card(context(quality=failed))
    assert "**failed**" in text and "despite the failed check" in text and "| this merge | ∞ |" in text
    assert ModelCard(text).data.eval_results is None  # an infinite perplexity is not a figure to index
    skipped = render_card(context(quality=QualityReport("skipped", ("the model has no tokenizer",))))
    assert "Quality check skipped: the model has no tokenizer." in skipped
    assert ModelCard(skipped).data.eval_results is None


def test_card_embeds_the_merge_anatomy_only_when_the_repo_has_it() -> None:
    with_plot = render_card(context(anatomy=True))
    without = render_card(context())
    assert "![merge anatomy](merge_anatomy.png)" in with_plot
    assert "[figures](merge_report.json)" in with_plot
    assert "merge_anatomy.png" not in without and "## Merge anatomy" not in without
    assert with_plot.index("## Recipe") < with_plot.index("## Merge anatomy") < with_plot.index("## License")
