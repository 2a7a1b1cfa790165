"""Names of the app's queues and tables, in one light module (function modules import it at
indexing time, so it must stay free of heavy imports)."""

# Queues
ZOOM_PRESENCE_QUEUE = "zoom-presence"  # verified user.presence_status_updated events
ZOOM_USERS_QUEUE = "zoom-user-events"  # verified Zoom user lifecycle events
RECONCILE_QUEUE = "reconcile"  # deferred, retried and keep-alive reconciles of one person
TEAMS_PRESENCE_QUEUE = "teams-presence"  # Graph notifications and sweep changes to apply
GRAPH_LIFECYCLE_QUEUE = "graph-lifecycle"  # Graph lifecycle notifications to act on
DIRECTORY_QUEUE = "directory"  # directory matching and scope runs: starts and continuations

# Tables
LINKS_TABLE = "links"  # one entity per linked person: the link and its sync state
ENTRA_INDEX_TABLE = "linksbyentra"  # Entra object id -> Zoom user id
SHARDS_TABLE = "shards"  # groups of <=650 Teams-watched people: one subscription, one sweep read each
CONNECTIONS_TABLE = "connections"  # connected accounts and their encrypted delegated tokens
SUBSCRIPTIONS_TABLE = "subscriptions"  # Graph subscription id -> shard and clientState
DIRECTORY_TABLE = "directory"  # enablement scopes, matching and scope runs (checkpoints, snapshots, reports)
CONNECT_FLOWS_TABLE = "connectflows"  # connect flows between redirect and callback; admin invitations
