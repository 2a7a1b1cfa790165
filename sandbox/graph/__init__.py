"""Entra ID + Microsoft Graph emulator: HTTPS on loopback with a CA generated at start.

    with GraphEmulator() as graph:                      # or .start() / .stop()
        graph.register_app(client_id, client_secret=..., application_permissions=[...])
        alice = graph.add_user(display_name="Alice", mail="alice@contoso.example")
        graph.set_teams_client(alice["id"], "Available")
        # point the app at graph.base_url (ENTRA_AUTHORITY_HOST), graph.graph_url
        # (GRAPH_BASE_URL) and graph.ca_bundle_path (REQUESTS_CA_BUNDLE)
        graph.presence(alice["id"])                     # what Teams shows now
        graph.clock.advance(300)                        # sessions fade and expire

Modules: ``emulator`` (server, Graph API), ``entra`` (login endpoints), ``presence``
(aggregation rules), ``subscriptions`` (change notifications), ``delivery_health`` (Graph's
throttling of slow notification endpoints), ``directory`` (users, groups, OData), ``crypto``
(keys, TLS, rich-notification encryption), ``faults`` (fault switches and the request log).
"""

from sandbox.graph.emulator import (
    DEFAULT_TENANT_DOMAIN,
    DEFAULT_TENANT_ID,
    GRAPH_NOTIFICATION_APP_ID,
    GraphEmulator,
)
from sandbox.graph.faults import FaultSwitches, RecordedRequest, RequestLog
from sandbox.graph.subscriptions import Delivery, DroppedNotification, SubscriptionRecord

__all__ = [
    "DEFAULT_TENANT_DOMAIN",
    "DEFAULT_TENANT_ID",
    "GRAPH_NOTIFICATION_APP_ID",
    "Delivery",
    "DroppedNotification",
    "FaultSwitches",
    "GraphEmulator",
    "RecordedRequest",
    "RequestLog",
    "SubscriptionRecord",
]
