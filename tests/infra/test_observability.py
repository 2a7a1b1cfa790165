"""infra/modules/observability.bicep: part of main.bicep, and every metric, span, attribute and
reason its workbook and alert queries name is one the code emits (shared/telemetry.py)."""

from __future__ import annotations

import re
from pathlib import Path

from shared import telemetry as t
from tests.infra import bicep_model as bm

MODULE = bm.INFRA / "modules" / "observability.bicep"
TEXT = MODULE.read_text()
ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = ("presence.", "vendor.", "subscriptions.", "connections.", "links.", "queues.", "webhooks.",
              "matching.")
# Every quoted dotted name in the KQL (metric and span names, span attributes).
QUOTED = set(re.findall(r"'([a-z_]+(?:\.[a-z_]+)+\.?)'", TEXT))


def _template() -> dict:
    return bm.parse(MODULE)


def _queries() -> str:
    """The KQL of the alerts and the workbook panels (multi-line strings of the module)."""
    return "\n".join(re.findall(r"'''(.*?)'''", TEXT, flags=re.S))


def test_main_deploys_the_module_against_the_application_insights_component():
    module = bm.parse(bm.MAIN)["modules"]["observability"]
    assert module["detail"]["path"] == "modules/observability.bicep"
    params = module["config"]["params"]
    text = str(params["applicationInsightsId"])
    assert all(f"'{part}'" in text for part in ("monitoring", "outputs", "resourceId"))
    assert params["actionGroupId"] == "alertActionGroupId"
    assert bm.parameter_default("alertActionGroupId") == ""


# What main.bicep decides itself rather than exposing one to one.
STRUCTURAL = {"applicationInsightsId", "namePrefix", "location", "tags", "actionGroupId", "alertsEnabled"}


def _bounds(spec: dict) -> dict:
    return {d["type"]: d.get("argument") for d in spec.get("decorators", []) if d["type"] != "description"}


def test_thresholds_and_working_hours_are_parameters_of_main():
    """docs/operations.md tells admins to change the thresholds and working hours: each must be a
    main.bicep parameter (same default and bounds as the module's) passed through to the module,
    or main.bicepparam could not set it."""
    module_params = _template()["parameters"]
    main = bm.parse(bm.MAIN)
    passed = main["modules"]["observability"]["config"]["params"]
    runbook = (ROOT / "docs" / "operations.md").read_text()
    tunable = set(module_params) - STRUCTURAL
    assert tunable >= {"syncLatencyP95ThresholdMs", "zoomNotSignedInThreshold", "graphForbiddenThreshold",
                       "subscriptionFailureThreshold", "noWebhookMinutes", "workingHoursTimeZone",
                       "workingHoursStart", "workingHoursEnd"}
    for name in sorted(tunable):
        assert f"`{name}`" in runbook, f"docs/operations.md does not name {name}"
        assert name in main["parameters"], f"main.bicep does not expose {name}"
        assert passed.get(name) == name, f"main.bicep does not pass {name} to the module"
        assert bm.parameter_default(name) == module_params[name]["default"], name
        assert _bounds(main["parameters"][name]) == _bounds(module_params[name]), name


def test_every_name_the_queries_use_is_emitted_by_the_code():
    known = set(t.INSTRUMENTS) | set(t.SPAN_NAMES) | {t.LATENCY_ATTRIBUTE}
    used = {name for name in QUOTED if name.startswith(NAMESPACES)}
    assert used, "no metric names found in the module"
    for name in used:
        if name.endswith("."):  # a prefix (startswith)
            assert any(i.startswith(name) for i in t.INSTRUMENTS), name
        else:
            assert name in known, f"{name} is queried but shared/telemetry.py does not emit it"


def test_the_workbook_shows_every_instrument():
    queries = _queries()
    for name in t.INSTRUMENTS:
        if name.startswith("presence.changes."):
            assert f"'{name}'" in queries or "'presence.changes.'" in queries, name
        else:
            assert f"'{name}'" in queries, f"{name} is not on the workbook"
    assert f"'{t.WRITE_SPAN}'" in queries and f"'{t.LATENCY_ATTRIBUTE}'" in queries


def test_dimensions_queried_are_attributes_the_code_sets():
    source = (ROOT / "shared" / "telemetry.py").read_text()
    dimensions = set(re.findall(r"customDimensions\['([a-z_.]+)'\]", _queries()))
    assert {"direction", "reason", "queue", "vendor", "status", "source"} <= dimensions
    for key in dimensions - {t.LATENCY_ATTRIBUTE}:
        assert f'"{key}"' in source, f"attribute {key} is queried but never set"


def test_reasons_the_alerts_match_are_recorded_by_the_code():
    sync = (ROOT / "shared" / "sync.py").read_text()
    assert 'telemetry.failed(TEAMS_TO_ZOOM, "zoom_not_signed_in")' in sync
    assert "'zoom_not_signed_in'" in _queries()
    http = (ROOT / "shared" / "http.py").read_text()
    assert "telemetry.vendor_request(" in http  # the status dimension the Graph 403 alert matches


def test_alert_rules_cover_the_documented_conditions_and_notify_the_action_group():
    template = _template()
    alerts = template["variables"]["alertDefinitions"]["value"]
    keys = {a["key"] for a in alerts}
    assert keys == {"poison-queue", "outage-retries", "subscription-failures", "sync-account-broken", "sync-latency",
                    "zoom-5301", "graph-403", "no-webhooks", "disables-held"}
    by_key = {a["key"]: str(a["query"]) for a in alerts}
    assert t.POISON_MESSAGES in by_key["poison-queue"] and t.CHANGES_DEAD_LETTERED in by_key["poison-queue"]
    assert t.CHANGES_RETRIED_AFTER_OUTAGE in by_key["outage-retries"]
    assert t.SUBSCRIPTION_RENEWAL_FAILURES in by_key["subscription-failures"]
    assert t.SUBSCRIPTION_RENEWAL_FAILURES in by_key["sync-account-broken"]
    assert t.LATENCY_ATTRIBUTE in by_key["sync-latency"] and "percentile(latency, 95)" in by_key["sync-latency"]
    assert t.CHANGES_FAILED in by_key["zoom-5301"]
    assert t.VENDOR_REQUEST_DURATION in by_key["graph-403"] and "'403'" in by_key["graph-403"]
    assert t.WEBHOOKS_RECEIVED in by_key["no-webhooks"] and "datetime_utc_to_local" in by_key["no-webhooks"]
    assert t.MATCHING_DISABLES_HELD in by_key["disables-held"] and "held > 0" in by_key["disables-held"]
    rule = next(r for r in template["resources"].values() if r["type"] == "Microsoft.Insights/scheduledQueryRules")
    body = rule["config"].get("config", rule["config"])
    assert body["properties"]["actions"]["actionGroups"] == "actionGroups"
    assert body["properties"]["scopes"] == ["applicationInsightsId"]


def _kql(node, params: dict) -> str:
    """An alert's query as deployed: the module's ``replace(..., string(param))`` calls resolved
    with the parameters' defaults (main.bicep's are the same, see the test above)."""
    if isinstance(node, str):
        return str(node)
    call = node["function"]
    args = call["parameters"]
    if call["type"] == "string":
        return str(params[str(args["value_to_convert"])]["default"])
    assert call["type"] == "replace", call["type"]
    return _kql(args["original_string"], params).replace(_kql(args["old_string"], params),
                                                         _kql(args["new_string"], params))


def _fires_on_one(kql: str, metric: str, reason: str) -> bool:
    """Would this rule fire on a window holding a single ``metric`` row (value 1, that reason)?
    Models the shapes the module uses: name and reason filters, then ``| where total >= N`` / ``> N``."""
    if f"name == '{metric}'" not in kql:
        return False
    for op, wanted in re.findall(r"customDimensions\['reason'\]\) (==|!=) '([a-z_]+)'", kql):
        if (op == "==") != (wanted == reason):
            return False
    op, threshold = re.findall(r"\| where \w+ (>=|>) (\d+)\s*$", kql)[-1]
    return 1 >= int(threshold) if op == ">=" else 1 > int(threshold)


def test_one_broken_sync_account_raises_an_alert():
    """The planner records one renewal failure of reason account_broken per account that breaks,
    and the exporter sends deltas, so the window holds exactly one: that must be enough."""
    from shared import subscriptions

    assert subscriptions.ACCOUNT_BROKEN == "account_broken"
    source = (ROOT / "shared" / "subscriptions.py").read_text()
    assert "def lose(self, account: str, why: str = ACCOUNT_BROKEN)" in source
    template = _template()
    firing = [a["key"] for a in template["variables"]["alertDefinitions"]["value"]
              if _fires_on_one(_kql(a["query"], template["parameters"]), t.SUBSCRIPTION_RENEWAL_FAILURES,
                               "account_broken")]
    assert firing == ["sync-account-broken"]
    # Other reasons keep the documented threshold (one failed renewal is not yet news).
    assert not any(_fires_on_one(_kql(a["query"], template["parameters"]), t.SUBSCRIPTION_RENEWAL_FAILURES,
                                 "VendorError") for a in template["variables"]["alertDefinitions"]["value"])


def test_every_alert_is_explained_in_the_operations_runbook():
    runbook = (ROOT / "docs" / "operations.md").read_text()
    section = runbook[runbook.index("## Alerts: what each means and what to do"):]
    for alert in _template()["variables"]["alertDefinitions"]["value"]:
        assert str(alert["displayName"]) in section, alert["key"]


def test_the_code_emits_what_the_module_documents():
    # The reverse direction: renaming an instrument in the code must fail here, not in production.
    for name in (t.CHANGES_OBSERVED, t.CHANGES_WRITTEN, t.CHANGES_SUPPRESSED_ECHO, t.CHANGES_DROPPED_STALE,
                 t.CHANGES_COALESCED, t.CHANGES_DEAD_LETTERED, t.CHANGES_RETRIED_AFTER_OUTAGE, t.SYNC_LATENCY,
                 t.VENDOR_REQUEST_DURATION,
                 t.SUBSCRIPTIONS_COUNT, t.SUBSCRIPTIONS_NEAREST_EXPIRY, t.CONNECTIONS_COUNT, t.LINKS_COUNT,
                 t.MATCHING_DISABLES_HELD):
        assert name in {"presence.changes.observed", "presence.changes.written", "presence.changes.suppressed_echo",
                        "presence.changes.dropped_stale", "presence.changes.coalesced",
                        "presence.changes.dead_lettered", "presence.changes.retried_after_outage",
                        "presence.sync.latency", "vendor.request.duration",
                        "subscriptions.count", "subscriptions.nearest_expiry_seconds", "connections.count",
                        "links.count", "matching.disables_held"}


# The window sizes (aggregation granularities) a log search alert rule accepts, in minutes; any
# other fails the rule's creation, and with it the deployment: Azure/azure-rest-api-specs#21258
# quotes the service ("Supported granularities are: 5, 10, 15, 30, 45, 60, 120, 180, 240, 300,
# 360, 1440, 2880"), as does hashicorp/terraform-provider-azurerm#18886.
ALERT_GRANULARITIES_MIN = {5, 10, 15, 30, 45, 60, 120, 180, 240, 300, 360, 1440, 2880}


def _minutes(duration: str) -> int:
    hours, minutes = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?", duration).groups()
    return int(hours or 0) * 60 + int(minutes or 0)


def test_every_alert_window_a_deployment_can_ask_for_is_one_azure_monitor_accepts():
    """Each rule's window and frequency, for every value of the parameter the window is built from
    (main.bicep's bounds are the module's, above): a window of 20 or 720 minutes would fail the
    whole deployment at the alert rule."""
    template = _template()
    allowed = {name: next((d["argument"] for d in spec.get("decorators", []) if d["type"] == "allowed"), None)
               for name, spec in template["parameters"].items()}
    checked = 0
    for alert in template["variables"]["alertDefinitions"]["value"]:
        assert _minutes(str(alert["frequency"])) in ALERT_GRANULARITIES_MIN, alert["key"]
        window = str(alert["window"])
        names = re.findall(r"\$\{(\w+)\}", window)
        if not names:
            assert _minutes(window) in ALERT_GRANULARITIES_MIN, alert["key"]
            continue
        (name,) = names
        assert allowed[name], f"{name} sets {alert['key']}'s window but does not list its allowed values"
        for value in allowed[name]:
            minutes = _minutes(window.replace(f"${{{name}}}", str(value)))
            assert minutes in ALERT_GRANULARITIES_MIN, f"{alert['key']}: {name}={value}"
            assert minutes >= _minutes(str(alert["frequency"])), f"{alert['key']}: {name}={value}"
            checked += 1
    assert checked >= 9  # noWebhookMinutes' values
