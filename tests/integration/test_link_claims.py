"""Admin and self links, and links made or enabled by Zoom user events, against a real Azurite.
One active link per Teams account under concurrency: an admin PUT, a self link and a user event
claim the account's index entry before writing their link (shared.links.claim_entra), so of two
racing for one account exactly one is made and the other is told so (409 / conflict). And a new
admin link's first reconcile."""

from __future__ import annotations

import json
import uuid

import pytest

from shared import admin, names, storage
from shared.connect import people
from shared.links import (
    STATUS_ACTIVE,
    STATUS_DISABLED,
    STATUS_ERROR,
    read_link,
    write_link,
    zoom_id_for_entra,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def claims_env(link_tables, unique_name, monkeypatch):
    """Links, index and directory tables of this test's own; queue puts recorded, not sent."""
    monkeypatch.setattr("shared.directory_runs.TABLE", "d" + unique_name)
    return link_tables


def _zoom_id() -> str:
    return "z" + uuid.uuid4().hex[:12]


def _put(zoom_id: str, entra_id: str) -> tuple[int, dict]:
    return admin.put_link(zoom_id, json.dumps({"entra_user_id": entra_id}).encode())


def _active_links_naming(entra_id: str, *zoom_ids: str) -> list[str]:
    found = []
    for zoom_id in zoom_ids:
        link, _ = read_link(zoom_id)
        if link is not None and link.entra_user_id == entra_id and link.status == STATUS_ACTIVE:
            found.append(zoom_id)
    return found


def _run_first(monkeypatch, module, name: str, when, interloper) -> list:
    """Patch ``module.name`` so that its first call for which ``when(args)`` holds first runs
    ``interloper()`` to the end; returns the interloper's result (in a list, once it ran)."""
    real = getattr(module, name)
    result: list = []

    def patched(*args, **kwargs):
        if not result and when(args):
            result.append(interloper())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)
    return result


def _interrupt(monkeypatch, at: str, module, zoom_id: str, interloper) -> list:
    """Run ``interloper()`` to its end in the middle of the save of ``zoom_id``'s link: just before
    ``module.write_link`` writes it (``at="link_write"``), or between the save's read of the Teams
    account's index entry and its conditional write of it (``"claim_write"``)."""
    if at == "link_write":
        return _run_first(monkeypatch, module, "write_link", lambda args: args[0].zoom_user_id == zoom_id,
                          interloper)
    return _run_first(monkeypatch, storage, "write_entity",
                      lambda args: args[0].startswith("i") and args[1].get("zoom_user_id") == zoom_id, interloper)


def _linked_then_deactivated(zoom_id: str, entra_id: str) -> None:
    """An active link, then disabled as Zoom's user.deactivated disables it (it keeps the account)."""
    assert _put(zoom_id, entra_id)[0] == 200
    link, etag = read_link(zoom_id)
    link.status, link.sync.active, link.disabled_reason = STATUS_DISABLED, False, "zoom_deactivated"
    write_link(link, etag)


@pytest.mark.parametrize("at", ["link_write", "claim_write"])
def test_two_admin_saves_racing_for_one_teams_account_make_one_link(claims_env, monkeypatch, at):
    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())
    # The save for B runs to its end in the middle of A's: just before A writes its link, or
    # between A's read of the index entry and its conditional write of it.
    other = _interrupt(monkeypatch, at, admin, zoom_a, lambda: _put(zoom_b, entra))
    first = _put(zoom_a, entra)
    assert len(other) == 1
    answers = {zoom_a: first, zoom_b: other[0]}
    assert sorted(status for status, _ in answers.values()) == [200, 409]
    winner = next(z for z, (status, _) in answers.items() if status == 200)
    loser = zoom_b if winner == zoom_a else zoom_a
    assert answers[loser][1]["zoom_user_id"] == winner
    assert _active_links_naming(entra, zoom_a, zoom_b) == [winner]
    assert read_link(loser)[0] is None  # refused: nothing was made for it
    assert zoom_id_for_entra(entra, fresh=True) == winner


def test_an_admin_save_racing_a_self_link_makes_one_link(claims_env, monkeypatch):
    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())
    other = _interrupt(monkeypatch, "link_write", admin, zoom_a, lambda: people.link_self(zoom_b, entra))
    assert _put(zoom_a, entra)[0] == 200
    assert other[0].outcome == people.LinkOutcome.CONFLICT and other[0].reason == "entra_linked_elsewhere"
    assert _active_links_naming(entra, zoom_a, zoom_b) == [zoom_a]
    assert zoom_id_for_entra(entra, fresh=True) == zoom_a


def test_a_self_link_racing_an_admin_save_makes_one_link(claims_env, monkeypatch):
    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())
    other = _interrupt(monkeypatch, "link_write", people, zoom_b, lambda: _put(zoom_a, entra))
    assert people.link_self(zoom_b, entra).outcome == people.LinkOutcome.CREATED
    status, body = other[0]
    assert status == 409 and body["zoom_user_id"] == zoom_b
    assert _active_links_naming(entra, zoom_a, zoom_b) == [zoom_b]
    assert zoom_id_for_entra(entra, fresh=True) == zoom_b


def test_re_enabling_a_link_while_another_takes_its_teams_account_makes_one_active(claims_env, monkeypatch):
    # A disabled link still names the account (its index entry too), so the account looks free to
    # a save for another Zoom user; the admin re-enables the first one at that very moment.
    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())
    _linked_then_deactivated(zoom_a, entra)
    other = _interrupt(monkeypatch, "link_write", admin, zoom_a, lambda: _put(zoom_b, entra))
    first = _put(zoom_a, entra)
    assert sorted([first[0], other[0][0]]) == [200, 409]
    winner = zoom_a if first[0] == 200 else zoom_b
    assert _active_links_naming(entra, zoom_a, zoom_b) == [winner]
    assert zoom_id_for_entra(entra, fresh=True) == winner


def test_a_claim_whose_save_gave_up_is_given_back(claims_env, monkeypatch):
    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())

    def always_changed(link, etag):
        raise storage.Conflict("changed")

    monkeypatch.setattr(admin, "write_link", always_changed)
    assert _put(zoom_a, entra) == (409, {"error": "the link changed concurrently; try again"})
    monkeypatch.undo()
    assert zoom_id_for_entra(entra, fresh=True) is None
    assert _put(zoom_b, entra)[0] == 200  # the account is free at once, not after the claim lapses


def test_a_claim_left_by_a_save_that_died_stands_for_a_while_then_lapses(claims_env, monkeypatch):
    from shared import links

    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())
    links.claim_entra(entra, zoom_a)  # and its link was never written
    status, body = _put(zoom_b, entra)
    assert status == 409 and body["zoom_user_id"] == zoom_a and "try again" in body["error"]
    monkeypatch.setattr(links, "ENTRA_CLAIM_HOLD_S", 0.0)
    assert _put(zoom_b, entra)[0] == 200
    assert zoom_id_for_entra(entra, fresh=True) == zoom_b


def test_a_new_admin_link_queues_a_reconcile_reading_both_sides(claims_env):
    zoom_id, entra = _zoom_id(), str(uuid.uuid4())
    assert _put(zoom_id, entra)[0] == 200
    reconciles = [m for queue_name, m in claims_env if queue_name == names.RECONCILE_QUEUE]
    assert [(m["zoom_user_id"], m["reason"], m.get("confirm_zoom"), m.get("confirm_teams")) for m in reconciles] \
        == [(zoom_id, "admin_link", True, True)]


def test_a_new_admin_link_whose_first_reconcile_cannot_be_queued_is_saved(claims_env, monkeypatch, caplog):
    from azure.core.exceptions import ServiceRequestError

    def broken(*args, **kwargs):
        raise ServiceRequestError("queue unreachable")

    monkeypatch.setattr(storage, "enqueue", broken)
    zoom_id, entra = _zoom_id(), str(uuid.uuid4())
    with caplog.at_level("WARNING", logger="shared.admin"):
        assert _put(zoom_id, entra)[0] == 200
    assert _active_links_naming(entra, zoom_id) == [zoom_id]
    assert "could not be queued" in caplog.text


# --- Zoom user events claim the account too ---------------------------------------------------------------------


def _zoom_user_event(event: str, zoom_id: str) -> str:
    from shared import matching

    return matching.handle_user_event({"kind": "zoom_user_event", "event": event, "zoom_user_id": zoom_id,
                                       "event_ts": 1000})


@pytest.mark.parametrize("at", ["link_write", "claim_write"])
def test_a_new_zoom_user_matched_while_an_admin_links_its_teams_account_makes_one_link(claims_env, monkeypatch, at):
    # user.created for B matches the Teams account by email while an admin saves A with it: the
    # admin's save runs to its end just before the match writes its link, or between the match's
    # read of the index entry and its conditional write of it.
    from shared import matching

    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())
    monkeypatch.setattr(matching.zoom_client, "get_user", lambda zoom_id: {"status": "active",
                                                                           "email": "pat@contoso.example"})
    monkeypatch.setattr(matching, "entra_candidates", lambda email: {entra: {"id": entra}})
    other = _interrupt(monkeypatch, at, matching, zoom_b, lambda: _put(zoom_a, entra))
    outcome = _zoom_user_event("user.created", zoom_b)
    assert len(other) == 1
    status, body = other[0]
    if at == "link_write":  # the match had claimed the account: the admin is told to try again
        assert (outcome, status, body["zoom_user_id"]) == ("linked", 409, zoom_b)
        winner = zoom_b
    else:  # the admin's save claimed it first: the match is reported as a conflict, nothing made
        assert (outcome, status) == ("conflict", 200)
        assert read_link(zoom_b)[0] is None
        winner = zoom_a
    assert _active_links_naming(entra, zoom_a, zoom_b) == [winner]
    assert zoom_id_for_entra(entra, fresh=True) == winner


def test_a_zoom_user_activated_while_an_admin_links_its_teams_account_makes_one_active(claims_env, monkeypatch):
    # A's link was made by a matching run (no claim on the index entry) and disabled when Zoom
    # deactivated the user. As user.activated enables it again, an admin saves B with the account,
    # which looks free: A's link is not active.
    from shared import links
    from shared.links import index_entra

    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())
    _linked_then_deactivated(zoom_a, entra)
    index_entra(entra, zoom_a)  # as a matching run repairs it: no claim standing
    monkeypatch.setattr("shared.matching.graph_client.get_user",
                        lambda entra_id, select: {"id": entra_id, "accountEnabled": True})
    # (the event's write goes through links.write_claimed_link, which looks write_link up there)
    other = _interrupt(monkeypatch, "link_write", links, zoom_a, lambda: _put(zoom_b, entra))
    assert _zoom_user_event("user.activated", zoom_a) == "enabled"
    status, body = other[0]
    assert (status, body["zoom_user_id"]) == (409, zoom_a)
    assert _active_links_naming(entra, zoom_a, zoom_b) == [zoom_a]
    assert zoom_id_for_entra(entra, fresh=True) == zoom_a


def test_links_keep_zooms_spelling_of_the_id_and_a_sign_in_retries_a_refused_one(claims_env):
    # Zoom may not take a lowercased id in its REST paths (docs/architecture.md, "Known
    # limitations"). An admin saves the link with the lowercased id; Zoom refuses it
    # (zoom_user_not_found). The person then signs in with Zoom, which names them as it spells
    # them: the link keeps that spelling, is active again and is reconciled. An admin saving the
    # link again, lowercased or spelt otherwise, does not overrule Zoom's spelling.
    issued, entra = "Zq" + uuid.uuid4().hex[:10].upper() + "xY", str(uuid.uuid4())
    key = issued.lower()
    assert _put(key, entra)[0] == 200
    link, etag = read_link(key)
    assert link.zoom_api_id == key
    link.status, link.sync.active, link.error_kind = STATUS_ERROR, False, "zoom_user_not_found"
    write_link(link, etag)
    claims_env.clear()

    assert people.link_self(issued, entra).outcome == people.LinkOutcome.CONFIRMED
    link, _ = read_link(key)
    assert (link.zoom_api_id, link.status, link.error_kind) == (issued, STATUS_ACTIVE, "")
    assert [m["reason"] for q, m in claims_env if q == names.RECONCILE_QUEUE] == ["zoom_id_recorded"]

    for typed in (key, issued.upper()):
        assert _put(typed, entra)[0] == 200
        assert read_link(key)[0].zoom_api_id == issued
    claims_env.clear()
    assert people.link_self(issued, entra).outcome == people.LinkOutcome.CONFIRMED
    assert claims_env == []  # nothing new to record: no write, no reconcile


def _with_our_teams_overlay(zoom_id: str) -> None:
    import time

    from shared.engine import TeamsOverlayRecord
    from shared.mapping import TeamsOverlay

    link, etag = read_link(zoom_id)
    now = time.time()
    link.sync.teams_overlay = TeamsOverlayRecord(TeamsOverlay("session", "Busy", "InACall"), now - 60, now + 3600,
                                                 "zoom", answered_at=now - 60)
    link.sync.teams_shows_ours = True
    write_link(link, etag)


def _releases(puts: list) -> list[dict]:
    return [m for q, m in puts if q == names.RECONCILE_QUEUE and m.get("kind") == "release"]


def test_a_repoint_whose_release_fails_after_the_save_leaves_it_queued(claims_env, monkeypatch):
    # Saved, the link names the new Teams account: a retried PUT would find it as asked and do
    # nothing, so the old account's release must already be queued when anything after fails.
    zoom_id, old, new = _zoom_id(), str(uuid.uuid4()), str(uuid.uuid4())
    assert _put(zoom_id, old)[0] == 200
    _with_our_teams_overlay(zoom_id)
    claims_env.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("storage hiccup reading a delegated connection")

    monkeypatch.setattr(admin, "release_overlays", broken)
    assert _put(zoom_id, new)[0] == 200
    assert read_link(zoom_id)[0].entra_user_id == new
    [release] = _releases(claims_env)
    assert release["entra_user_id"] == old and set(release["left"]) == {"teams"}  # Zoom's stays with the link


def test_a_repoint_whose_release_cannot_be_queued_changes_nothing(claims_env, monkeypatch):
    zoom_id, old, new = _zoom_id(), str(uuid.uuid4()), str(uuid.uuid4())
    assert _put(zoom_id, old)[0] == 200
    _with_our_teams_overlay(zoom_id)

    def queue_down(queue_name, message, **kwargs):
        if message.get("kind") == "release":
            raise RuntimeError("queue unavailable")
        claims_env.append((queue_name, message))

    monkeypatch.setattr(storage, "enqueue", queue_down)
    status, body = _put(zoom_id, new)
    assert status == 503 and "nothing was changed" in body["error"]
    assert read_link(zoom_id)[0].entra_user_id == old
    assert zoom_id_for_entra(new, fresh=True) is None  # the new account's claim was let go


def test_a_claim_whose_link_was_written_and_disabled_since_frees_the_account_at_once(claims_env):
    # The claim's writer has been and gone: the link it made was written, then disabled (its Zoom
    # user deactivated). Another link may take the account now, not five minutes later.
    zoom_a, zoom_b, entra = _zoom_id(), _zoom_id(), str(uuid.uuid4())
    assert _put(zoom_a, entra)[0] == 200
    assert _put(zoom_b, entra)[0] == 409  # held actively
    link, etag = read_link(zoom_a)
    link.status, link.sync.active, link.disabled_reason = STATUS_DISABLED, False, "zoom_deactivated"
    write_link(link, etag)
    assert _put(zoom_b, entra)[0] == 200
    assert zoom_id_for_entra(entra, fresh=True) == zoom_b


def test_a_claimed_write_whose_answer_was_lost_keeps_its_claim_only_if_it_landed(claims_env, monkeypatch):
    from shared import links
    from shared.engine import UserSync
    from shared.links import Link, claim_entra

    real = links.write_link
    landed, lost = (_zoom_id(), str(uuid.uuid4())), (_zoom_id(), str(uuid.uuid4()))

    def answer_lost(link, etag):
        if link.zoom_user_id == landed[0]:
            real(link, etag)  # written, then the answer is lost
        raise TimeoutError("the answer was lost")

    monkeypatch.setattr(links, "write_link", answer_lost)
    for zoom_id, entra in (landed, lost):
        link = Link(sync=UserSync(zoom_id, entra, frozenset({"zoom_to_teams"})))
        claim = claim_entra(entra, zoom_id)
        link.entra_claimed_at = claim.claimed_at
        with pytest.raises(TimeoutError):
            links.write_claimed_link(link, None, claim)
    assert zoom_id_for_entra(landed[1], fresh=True) == landed[0]  # the link is there: so is its claim
    assert zoom_id_for_entra(lost[1], fresh=True) is None  # given back


def test_a_run_repairs_an_index_entry_only_as_it_listed_it_or_gone(claims_env):
    # As the run listed it: repaired. Gone since (the run's own re-point of its holder deletes it):
    # repaired too, nobody claims an entry by deleting it. Naming another link since: left.
    from shared.links import _delete_index_if_points_to, index_entra, repair_entra_index

    entra = str(uuid.uuid4())
    index_entra(entra, "z-listed")
    assert repair_entra_index(entra, "z-owner", "z-listed") is True
    assert zoom_id_for_entra(entra, fresh=True) == "z-owner"
    _delete_index_if_points_to(entra, "z-owner")
    assert repair_entra_index(entra, "z-owner", "z-listed") is True
    assert zoom_id_for_entra(entra, fresh=True) == "z-owner"
    index_entra(entra, "z-admin")  # claimed for another link since the listing
    assert repair_entra_index(entra, "z-owner", "z-listed") is False
    assert zoom_id_for_entra(entra, fresh=True) == "z-admin"
