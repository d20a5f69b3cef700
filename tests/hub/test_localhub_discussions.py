"""Discussions and pull requests, in the shapes huggingface_hub's community API parses."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.community import DiscussionComment, DiscussionStatusChange, DiscussionTitleChange
from huggingface_hub.errors import HfHubHTTPError


@pytest.fixture
def repo(alice: HfApi, repo_name: Callable[[str], str]) -> str:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    return repo_id


def test_discussion_lifecycle(alice: HfApi, bob: HfApi, repo: str) -> None:
    created = bob.create_discussion(repo, "Please merge these", description="Merge a/b with c/d, please.")
    assert created.num == 1 and created.author == "bob" and created.status == "open"
    assert not created.is_pull_request and created.repo_id == repo
    first = created.events[0]
    assert isinstance(first, DiscussionComment) and first.content == "Merge a/b with c/d, please."

    reply = alice.comment_discussion(repo, 1, "Queued: job 42.")
    assert isinstance(reply, DiscussionComment) and reply.author == "alice" and not reply.edited
    edited = alice.edit_discussion_comment(repo, 1, reply.id, "Done: job 42 succeeded.")
    assert edited.content == "Done: job 42 succeeded." and edited.edited and len(edited.edit_history) == 2
    assert edited.edit_history[-1]["raw"] == "Queued: job 42."
    with pytest.raises(HfHubHTTPError) as err:  # only the author edits a comment
        bob.edit_discussion_comment(repo, 1, reply.id, "hijacked")
    assert err.value.response.status_code == 403

    spam = bob.comment_discussion(repo, 1, "buy now")
    with pytest.warns(UserWarning, match="Hidden comments"):
        hidden = alice.hide_discussion_comment(repo, 1, spam.id)
    assert hidden.hidden

    renamed = bob.rename_discussion(repo, 1, "Merge request: a/b + c/d")
    assert isinstance(renamed, DiscussionTitleChange) and renamed.old_title == "Please merge these"
    closed = alice.change_discussion_status(repo, 1, "closed", comment="Merged in another repo.")
    assert isinstance(closed, DiscussionStatusChange) and closed.new_status == "closed"

    details = alice.get_discussion_details(repo, 1)
    assert details.title == "Merge request: a/b + c/d" and details.status == "closed"
    assert [e.type for e in details.events] == [
        "comment",
        "comment",
        "comment",
        "title-change",
        "comment",
        "status-change",
    ]
    comments = [e for e in details.events if isinstance(e, DiscussionComment)]
    assert comments[1].content == "Done: job 42 succeeded." and comments[2].hidden


def test_listing_and_filters(alice: HfApi, bob: HfApi, repo: str) -> None:
    bob.create_discussion(repo, "First question")
    alice.create_pull_request(repo, "A draft PR")
    alice.create_commit(repo, [CommitOperationAdd("x.txt", b"x")], commit_message="Real PR", create_pr=True)
    everything = list(alice.get_repo_discussions(repo))
    assert [(d.num, d.title, d.is_pull_request) for d in everything] == [
        (3, "Real PR", True),
        (2, "A draft PR", True),
        (1, "First question", False),
    ]
    assert [d.num for d in alice.get_repo_discussions(repo, discussion_type="discussion")] == [1]
    assert [d.num for d in alice.get_repo_discussions(repo, author="bob")] == [1]
    assert {d.status for d in alice.get_repo_discussions(repo, discussion_type="pull_request")} == {
        "draft",
        "open",
    }


def test_listing_is_paged(alice: HfApi, repo: str) -> None:
    for i in range(55):  # the Hub's pages hold 50
        alice.create_discussion(repo, f"Question number {i}")
    assert len(list(alice.get_repo_discussions(repo))) == 55


def test_merge_pull_request(alice: HfApi, bob: HfApi, repo: str) -> None:
    alice.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo)
    pr = alice.create_commit(
        repo, [CommitOperationAdd("b.txt", b"from pr")], commit_message="Add b", create_pr=True
    )
    alice.upload_file(path_or_fileobj=b"main moved", path_in_repo="c.txt", repo_id=repo)  # target moves on
    with pytest.raises(HfHubHTTPError) as err:
        bob.merge_pull_request(repo, pr.pr_num)  # type: ignore[arg-type]
    assert err.value.response.status_code == 403
    alice.merge_pull_request(repo, pr.pr_num, comment="Thanks!")  # type: ignore[arg-type]
    assert sorted(alice.list_repo_files(repo)) == [".gitattributes", "a.txt", "b.txt", "c.txt"]
    details = alice.get_discussion_details(repo, pr.pr_num)  # type: ignore[arg-type]
    assert details.status == "merged" and details.merge_commit_oid == alice.model_info(repo).sha
    assert details.target_branch == "refs/heads/main"
    with pytest.raises(HfHubHTTPError):
        alice.merge_pull_request(repo, pr.pr_num)  # type: ignore[arg-type]


def test_conflicting_pull_request_is_409(alice: HfApi, repo: str) -> None:
    pr = alice.create_commit(repo, [CommitOperationAdd("a.txt", b"pr")], commit_message="A", create_pr=True)
    alice.upload_file(path_or_fileobj=b"main", path_in_repo="a.txt", repo_id=repo)
    with pytest.raises(HfHubHTTPError) as err:
        alice.merge_pull_request(repo, pr.pr_num)  # type: ignore[arg-type]
    assert err.value.response.status_code == 409
    assert alice.get_discussion_details(repo, pr.pr_num).status == "open"  # type: ignore[arg-type]


def test_discussions_need_a_token_and_a_visible_repo(
    anon: HfApi, bob: HfApi, alice: HfApi, repo_name: Callable[[str], str]
) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    private = repo_name("acme")
    alice.create_repo(private, private=True)
    with pytest.raises(RepositoryNotFoundError):
        bob.create_discussion(private, "Can I see this?")
    public = repo_name("acme")
    alice.create_repo(public)
    with pytest.raises(HfHubHTTPError) as err:
        anon.create_discussion(public, "Anonymous question")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        alice.get_discussion_details(public, 99)
    assert err.value.response.status_code == 404
