"""docs/security.md matches the code: every Graph permission it lists is one the infrastructure or
the code asks for, and every one they ask for is listed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRAPH_PERMISSION = re.compile(r"\b(?:Presence|User|GroupMember|Group|Directory|Calendars|Mail|Team|Chat)"
                              r"\.(?:Read|ReadWrite|ReadBasic)(?:\.All)?\b|\boffline_access\b")


def documented() -> set[str]:
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    section = text.split("## 2. Permissions", 1)[1].split("### Zoom", 1)[0]
    # Only the permission column of the tables (first cell), not the prose.
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {m.group(0) for cell in cells for m in GRAPH_PERMISSION.finditer(cell)}


def requested() -> set[str]:
    found: set[str] = set()
    for folder, pattern in (("infra", "*.bicep*"), ("shared", "*.py"), ("functions", "*.py")):
        for path in (ROOT / folder).rglob(pattern):
            found |= {m.group(0) for m in GRAPH_PERMISSION.finditer(path.read_text(encoding="utf-8"))}
    return found


def test_every_documented_graph_permission_is_used_and_vice_versa():
    docs, code = documented(), requested()
    assert docs, "no permission found in docs/security.md"
    assert docs - code == set(), "documented but asked for nowhere"
    assert code - docs == set(), "asked for but not documented"


def test_zoom_scopes_in_the_doc_match_the_deploy_guide():
    security = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    deploy = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    scope = re.compile(r"`((?:user|group):[a-z_:]+)`")
    zoom_section = security.split("### Zoom", 1)[1].split("## 3.", 1)[0]
    listed = set(scope.findall(zoom_section))
    # The same names, granular and classic, in both guides (no exemption for any of them).
    assert listed and listed <= set(scope.findall(deploy))
    assert {"group:read:list_members:admin", "group:read:admin"} <= listed


def test_graph_key_rotation_keeps_the_old_key_until_subscriptions_move():
    """Every deployment overwrites the graph-notifications host key, while live subscriptions call
    with the old value (renewing keeps their URL): the old value must stay valid as an extra host
    key, added before the redeploy, and the app restarted so that it re-creates them at once."""
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    bullet = " ".join(text.split("- **Function keys.**", 1)[1].split("\n- **", 1)[0].split())
    assert "graph-notifications-next" not in bullet
    steps = [bullet.index(s) for s in ("--key-name graph-notifications-prev --key-value <old>",
                                       "Export the new `GRAPH_NOTIFICATION_KEY` and redeploy",
                                       "az functionapp restart", "az functionapp keys delete")]
    assert steps == sorted(steps)
    subscriptions = (ROOT / "shared" / "subscriptions.py").read_text(encoding="utf-8")
    assert '"subscription_url_id": self.url_id' in subscriptions  # re-created when the key changes
