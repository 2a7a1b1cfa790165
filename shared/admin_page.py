"""The admin status page (``GET /api/manage``): server-rendered HTML, a little CSS, a few lines of
script to filter the table as one types. No build step and no external assets; every value is
escaped. The Content-Security-Policy allows only this response's own inline style and script."""

from __future__ import annotations

import html
import logging
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from shared.admin import LINK_STATES, token_refused
from shared.links import Link

if TYPE_CHECKING:
    from shared.status import Found

log = logging.getLogger(__name__)

PAGE_SIZE_DEFAULT = 200
PAGE_SIZE_MAX = 1000


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


_CSS = """
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#5b6475; --line:#dde1e8; --ok:#1a7f37;
        --warn:#9a6700; --bad:#c62828; --badbg:#fdecea; --accent:#2451b7; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; background:var(--bg);
       color:var(--ink); }
header { background:#1d2330; color:#fff; padding:14px 24px; display:flex; align-items:baseline; gap:16px; }
header h1 { font-size:18px; margin:0; font-weight:600; }
header span { color:#b9c1d0; font-size:12px; }
main { padding:18px 24px 40px; max-width:1500px; margin:0 auto; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(210px,1fr)); gap:12px; margin-bottom:18px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.card h2 { font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); margin:0 0 6px; }
.card .big { font-size:22px; font-weight:600; }
.card .sub { color:var(--muted); font-size:12px; }
.card.bad { border-color:var(--bad); background:var(--badbg); }
.ok { color:var(--ok); } .warn { color:var(--warn); } .bad { color:var(--bad); }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px;
          margin-bottom:18px; }
section h2 { font-size:15px; margin:0 0 10px; }
form.filters { display:flex; flex-wrap:wrap; gap:8px; align-items:center; margin-bottom:10px; }
input[type=search], select { padding:6px 8px; border:1px solid var(--line); border-radius:6px; font:inherit; }
input#search { min-width:280px; }
button { padding:6px 12px; border:1px solid var(--accent); background:var(--accent); color:#fff; border-radius:6px;
         font:inherit; cursor:pointer; }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; background:#fafbfc; position:sticky; top:0; }
td.mono, span.mono { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12px; }
tr.error td { background:var(--badbg); }
.pill { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; border:1px solid var(--line); }
.pill.active { color:var(--ok); border-color:#b7dfc3; } .pill.disabled { color:var(--warn); border-color:#e8d39a; }
.pill.error { color:#fff; background:var(--bad); border-color:var(--bad); }
.ours { font-size:11px; color:var(--accent); }
.muted { color:var(--muted); }
#count { color:var(--muted); font-size:12px; }
.pager { margin-top:10px; }
a { color:var(--accent); }
"""

_SCRIPT = """
(function () {
  var input = document.getElementById('search');
  // People only: the "No people to show." row has nothing to search (and stays shown).
  var rows = Array.prototype.slice.call(document.querySelectorAll('#people tbody tr[data-search]'));
  var count = document.getElementById('count');
  function apply() {
    var needle = input.value.trim().toLowerCase();
    var shown = 0;
    rows.forEach(function (row) {
      var hit = !needle || row.getAttribute('data-search').indexOf(needle) !== -1;
      row.hidden = !hit;
      if (hit) { shown += 1; }
    });
    count.textContent = shown + ' of ' + rows.length + ' shown';
  }
  input.addEventListener('input', apply);
  apply();
})();
"""


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _card(title: str, big: Any, sub: str = "", *, bad: bool = False) -> str:
    cls = "card bad" if bad else "card"
    return (f'<div class="{cls}"><h2>{_e(title)}</h2><div class="big">{_e(big)}</div>'
            f'<div class="sub">{sub}</div></div>')


def _cards(status: dict, key: str | None) -> str:
    cards = []
    links = status.get("links") or {}
    if "error" in links:
        cards.append(_card("People", "?", _e(links["error"]), bad=True))
    else:
        by_state = links.get("by_state", {})
        errors = int(by_state.get("error", 0))
        sub = (f'<span class="ok">{_e(by_state.get("active", 0))} active</span> · '
               f'<span class="warn">{_e(by_state.get("disabled", 0))} disabled</span> · '
               f'<span class="bad">{_e(errors)} in error</span>')
        if not links.get("complete", True):
            sub += " · partial count"
        if links.get("counted_at"):
            sub += (f' · counted {_e(links["counted_at"])} · '
                    f'<a id="count-now" href="{_e(_with_key("manage?fresh=1", key))}">count now</a>')
        cards.append(_card("People linked", links.get("total", 0), sub, bad=errors > 0))
        by_dir = links.get("by_direction", {})
        both = f'{by_dir.get("zoom_to_teams", 0)} / {by_dir.get("teams_to_zoom", 0)}'
        cards.append(_card("Directions in effect", both,
                           f'Zoom→Teams / Teams→Zoom · {_e(by_dir.get("none", 0))} none · '
                           f'{_e(links.get("opted_out", 0))} opted out'))
        recent = (links.get("recent_errors") or {}).get("by_kind", {})
        total_recent = sum(int(v) for v in recent.values())
        cards.append(_card("Errors (24 h)", total_recent,
                           _e(", ".join(f"{k}: {v}" for k, v in sorted(recent.items())) or "none"),
                           bad=total_recent > 0))
    subs = status.get("subscriptions") or {}
    if "error" in subs:
        cards.append(_card("Subscriptions", "?", _e(subs["error"]), bad=True))
    else:
        nxt = subs.get("next_expiry_in_s")
        cards.append(_card("Subscriptions", f'{subs.get("active", 0)} / {subs.get("shards", 0)}',
                           f'active / shards · {_e(subs.get("on_poll", 0))} on the poll · next expiry '
                           f'{_e(_age(nxt) if nxt is not None else "–")}',
                           bad=bool(subs.get("expiring_soon"))))
        cards.append(_card("Last sweep", subs.get("last_sweep_at") or "never", ""))
    conns = status.get("connections") or {}
    if "error" in conns:
        cards.append(_card("Connected accounts", "?", _e(conns["error"]), bad=True))
    else:
        sync = conns.get("items") or []
        sync_broken = sum(1 for c in sync if c.get("status") != "ok")
        cards.append(_card("Sync accounts", f'{len(sync) - sync_broken} / {len(sync)}',
                           f'healthy / connected · {_e(sync_broken)} broken', bad=sync_broken > 0))
        own = conns.get("self") or {}
        sub = (f'<span class="ok">{_e(own.get("ok", 0))} healthy</span> · '
               f'<span class="{"bad" if own.get("broken") else "muted"}">{_e(own.get("broken", 0))} broken</span>')
        if not own.get("complete", True):
            sub += " · partial count"
        sub += f' · <a id="own-connections" href="{_e(_with_key("manage/connections?purpose=self", key))}">list</a>'
        cards.append(_card("People connected", own.get("total", 0), sub))
    queues = status.get("queues") or {}
    if "error" in queues:
        cards.append(_card("Queues", "?", _e(queues["error"]), bad=True))
    else:
        cards.append(_card("Queues", queues.get("messages", 0),
                           f'messages waiting · <span class="{"bad" if queues.get("poison") else "muted"}">'
                           f'{_e(queues.get("poison", 0))} dead-lettered</span>', bad=bool(queues.get("poison"))))
    scopes = status.get("scopes") or {}
    if "error" in scopes:
        cards.append(_card("Scopes", "?", _e(scopes["error"]), bad=True))
    else:
        z2t, t2z = bool(scopes.get("zoom_to_teams")), bool(scopes.get("teams_to_zoom"))
        big = "Both ways" if z2t and t2z else "Zoom→Teams only" if z2t else "Teams→Zoom only" if t2z else "Off"
        groups = len(scopes.get("entra_group_ids") or []) + len(scopes.get("zoom_group_ids") or [])
        cards.append(_card("Scopes", big, f'members of {_e(groups)} group(s)' if groups else "everyone linked",
                           bad=big == "Off"))
    matching = status.get("matching") or {}
    report = matching.get("report") if isinstance(matching, dict) else None
    run = matching.get("run") if isinstance(matching, dict) else None
    if isinstance(matching, dict) and "error" in matching:  # unread, which is not "not run yet"
        cards.append(_card("Directory matching", "?", _e(matching["error"]), bad=True))
    elif report:
        c = report.get("counts", {})
        problems = int(c.get("ambiguous_zoom", 0)) + int(c.get("ambiguous_entra", 0)) + int(c.get("conflicts", 0))
        cards.append(_card("Directory matching", f'{c.get("matched", 0)} matched',
                           f'{_e(c.get("unmatched_zoom", 0))} unmatched · {_e(problems)} ambiguous · '
                           f'{_e(report.get("finished_at") or "")}'))
        held = int(c.get("disables_held", 0) or 0)
        if held:
            guard = report.get("disable_guard") or {}
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted((guard.get("by_reason") or {}).items()))
            allowed = f', {guard["allowed"]} allowed' if guard.get("allowed") is not None else ""
            cards.append(_card("Disables held", held,
                               f'the last matching run would have disabled {_e(held)} people, over the limit of '
                               f'{_e(guard.get("limit"))}{_e(allowed)} (when it began: {_e(reasons)}); check the '
                               f'directories, then <span class="mono">POST manage/links/sync '
                               f'{{"allow_disables": {_e(held)}}}</span>', bad=True))
    elif run:
        cards.append(_card("Directory matching", run.get("status", "?"), _e(run.get("started_at") or "")))
    else:
        cards.append(_card("Directory matching", "not run yet", "runs daily, or on POST manage/links/sync"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _shows(reported: str, ours: str, shows_ours: bool) -> str:
    """What a side shows: the last report from it, or the overlay we put there (marked as ours)."""
    if ours and (shows_ours or not reported or reported == ours):
        return f'{_e(ours)} <span class="ours">(ours)</span>'
    if not reported:
        return '<span class="muted">–</span>'
    extra = f' <span class="ours">· ours: {_e(ours)}</span>' if ours else ""
    return f"{_e(reported)}{extra}"


def _row(link: Link, scope_state: str) -> str:
    s = link.sync
    state = link.status
    detail = link.disabled_reason if state == "disabled" else ""
    if scope_state not in ("in_scope", ""):
        detail = (detail + " · " if detail else "") + scope_state
    error = f"{link.error_kind}: {link.error_detail}" if link.error_kind else ""
    search = " ".join([link.email, link.zoom_user_id, link.entra_user_id, state, detail, link.error_kind]).lower()
    cls = ' class="error"' if state == "error" or link.error_kind else ""
    directions = ", ".join("Zoom→Teams" if d == "zoom_to_teams" else "Teams→Zoom" for d in sorted(s.directions))
    zoom_ours = s.zoom_overlay.status if s.zoom_overlay else ""
    teams_ours = f"{s.teams_overlay.overlay.availability}/{s.teams_overlay.overlay.activity}" if s.teams_overlay else ""
    return (
        f'<tr{cls} data-search="{_e(search)}">'
        f'<td>{_e(link.email) or "<span class=muted>–</span>"}</td>'
        f'<td class="mono">{_e(link.zoom_user_id)}</td>'
        f'<td class="mono">{_e(link.entra_user_id)}</td>'
        f'<td><span class="pill {_e(state)}">{_e(state)}</span> <span class="muted">{_e(detail)}</span></td>'
        f'<td>{_e(directions) or "<span class=muted>none</span>"}</td>'
        f'<td>{_shows(link.zoom_shows, zoom_ours, s.zoom_shows_ours)}</td>'
        f'<td>{_shows(link.teams_shows, teams_ours, s.teams_shows_ours)}</td>'
        f'<td class="mono">{_e(link.last_sync_at) or "<span class=muted>never</span>"}</td>'
        f'<td class="bad">{_e(error)}</td>'
        "</tr>"
    )


def _sync_account_row(account: dict) -> str:
    healthy = account.get("status") == "ok"
    cls = "" if healthy else ' class="error"'
    return (
        f"<tr{cls}>"
        f'<td class="mono">{_e(account.get("account_id"))}</td>'
        f'<td>{_e(account.get("display_hint")) or "<span class=muted>–</span>"}</td>'
        f'<td><span class="pill {"active" if healthy else "error"}">{_e(account.get("status"))}</span></td>'
        f'<td class="bad">{_e(account.get("broken_reason"))}</td>'
        f'<td class="mono">{_e(account.get("updated_at"))}</td>'
        "</tr>"
    )


def _sync_accounts(status: dict) -> str:
    """Each sync account: Graph push for its shards depends on it, so a broken one gets a row."""
    items = (status.get("connections") or {}).get("items") or []
    if not items:
        return ""
    rows = "".join(_sync_account_row(account) for account in items)
    return ('<section id="sync-accounts"><h2>Sync accounts</h2><table><thead><tr><th>Account</th>'
            "<th>Signed in as</th><th>State</th><th>Why broken</th><th>Updated</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></section>")


def _with_key(path: str, key: str | None) -> str:
    """A link to an admin route, keeping the admin key the page was opened with."""
    if not key:
        return path
    return f'{path}{"&" if "?" in path else "?"}{urlencode({"code": key})}'


def _url(params: dict[str, str | None]) -> str:
    clean = {k: v for k, v in params.items() if v}
    return "?" + urlencode(clean) if clean else "?"


def render(status: dict, links: list[Link], scope_states: dict[str, str], *, q: str = "", state: str = "",
           continuation: str | None = None, page_size: int = PAGE_SIZE_DEFAULT, key: str | None = None,
           notice: str = "") -> tuple[str, str]:
    """The page and the nonce its CSP allows."""
    nonce = secrets.token_urlsafe(16)
    options = "".join(
        f'<option value="{_e(s)}"{" selected" if s == state else ""}>{_e(s or "any state")}</option>'
        for s in ("", *LINK_STATES)
    )
    rows = "".join(_row(link, scope_states.get(link.zoom_user_id, "")) for link in links)
    if not rows:
        rows = '<tr><td colspan="9" class="muted">No people to show.</td></tr>'
    pager = ""
    if continuation:
        href = _url({"q": q, "state": state, "page_size": str(page_size), "continuation": continuation, "code": key})
        pager = f'<div class="pager"><a id="next" href="{_e(href)}">Next page →</a></div>'
    hidden_key = f'<input type="hidden" name="code" value="{_e(key)}">' if key else ""
    json_href = _with_key("manage/status", key)
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>presence-bridge · sync status</title>
<style nonce="{nonce}">{_CSS}</style>
</head>
<body>
<header><h1>presence-bridge · sync status</h1><span>generated {_e(status.get("generated_at"))}</span></header>
<main>
{f'<p class="bad">{_e(notice)}</p>' if notice else ""}
{_cards(status, key)}
{_sync_accounts(status)}
<section>
<h2>People</h2>
<form class="filters" method="get" action="">
  {hidden_key}
  <input type="search" id="search" name="q" value="{_e(q)}" placeholder="Filter by email or id" autocomplete="off"
         aria-label="Filter people">
  <select name="state" aria-label="State">{options}</select>
  <button type="submit">Search all</button>
  <span id="count"></span>
</form>
<table id="people">
<thead><tr><th>Person</th><th>Zoom user</th><th>Entra user</th><th>State</th><th>Directions</th>
<th>Zoom shows</th><th>Teams shows</th><th>Last sync</th><th>Error</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{pager}
</section>
<p class="muted">Typing filters the people on this page; “Search all” searches every link. The same data as JSON:
<a href="{_e(json_href)}">manage/status</a>.</p>
</main>
<script nonce="{nonce}">{_SCRIPT}</script>
</body>
</html>
"""
    return page, nonce


def content_security_policy(nonce: str) -> str:
    return (f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; img-src 'none'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a storage outage raises: the service's error answers, and no answer at all."""
    from azure.core.exceptions import AzureError

    return AzureError, ConnectionError, TimeoutError


def _unavailable(exc: BaseException, notices: list[str]) -> Found:
    from shared.status import Found

    # The type only: a storage error's message may hold the request's URL.
    log.warning("admin page: people unavailable (%s)", type(exc).__name__)
    notices.append("People could not be read from storage just now; try again in a moment.")
    return Found([], None, 0)


def _people(q: str, state: str | None, page_size: int, continuation: str | None, notices: list[str]) -> Found:
    """One page of "Search all". A continuation that is not ours, or that the table service refuses,
    shows the first page; a storage outage shows a notice, not a 500 (the cards say what else is down)."""
    from azure.core.exceptions import HttpResponseError

    from shared.status import search_links

    try:
        return search_links(q, state, page_size, continuation)
    except ValueError:
        pass
    except HttpResponseError as exc:
        if not token_refused(exc, continuation):
            return _unavailable(exc, notices)
    except _storage_errors() as exc:
        return _unavailable(exc, notices)
    log.info("admin page: invalid continuation token ignored")
    notices.append("That page link is not valid; showing the first page.")
    try:
        return search_links(q, state, page_size, None)
    except _storage_errors() as exc:
        return _unavailable(exc, notices)


def _scope_states(links: list[Link]) -> dict[str, str]:
    """Why each person syncs less than asked; none shown while the scopes cannot be read (the Scopes
    card says so) rather than a guess from the defaults."""
    from shared import scopes

    try:
        current = scopes.read_scopes()
    except _storage_errors() as exc:
        log.warning("admin page: scopes unavailable (%s)", type(exc).__name__)
        return {}
    return {link.zoom_user_id: scopes.scope_state(link, current) for link in links}


def redirect_to_canonical(url: str) -> str | None:
    """Where to send a request for the page at ``url`` with a trailing slash (the host routes it
    here too): its links are relative to the page, and from ``.../manage/`` they would resolve
    under it. None when the URL is the page's own."""
    parts = urlsplit(url)
    if not parts.path.endswith("/"):
        return None
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def page_response(params: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    """Build the page from the request's query parameters: (status, html, headers)."""
    from shared.status import collect_status, fresh_requested

    q = (params.get("q") or "").strip()[:200]
    state = (params.get("state") or "").strip()
    notices: list[str] = []
    if state and state not in LINK_STATES:
        log.info("admin page: unknown state filter ignored")
        notices.append("Unknown state filter ignored.")
        state = ""
    try:
        page_size = int(params.get("page_size") or PAGE_SIZE_DEFAULT)
    except ValueError:
        page_size = PAGE_SIZE_DEFAULT
    page_size = max(1, min(PAGE_SIZE_MAX, page_size))
    continuation = params.get("continuation") or None
    found = _people(q, state or None, page_size, continuation, notices)
    links, token = found.links, found.continuation
    if (q or state) and token and len(links) < page_size:
        # Out of time before the page filled: say how far it got, not just "no people".
        notices.append(f"Searched {found.searched} links in this page's time; the next page searches on "
                       "(a whole Zoom or Entra id is found at once).")
    status = collect_status(fresh=fresh_requested(params))
    states = _scope_states(links)
    body, nonce = render(status, links, states, q=q, state=state, continuation=token, page_size=page_size,
                         key=params.get("code"), notice=" ".join(notices))
    headers = {
        "Content-Security-Policy": content_security_policy(nonce),
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
    }
    return 200, body, headers
