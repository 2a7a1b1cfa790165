"""The Entra ID + Microsoft Graph emulator; the implementation lives in ``sandbox.graph``."""

from sandbox.graph import (
    DEFAULT_TENANT_DOMAIN,
    DEFAULT_TENANT_ID,
    GRAPH_NOTIFICATION_APP_ID,
    Delivery,
    FaultSwitches,
    GraphEmulator,
    RecordedRequest,
    SubscriptionRecord,
)

__all__ = [
    "DEFAULT_TENANT_DOMAIN",
    "DEFAULT_TENANT_ID",
    "GRAPH_NOTIFICATION_APP_ID",
    "Delivery",
    "FaultSwitches",
    "GraphEmulator",
    "RecordedRequest",
    "SubscriptionRecord",
]
