"""The Functions app: registers the blueprints in functions/ and nothing else.

Importing this module must never read settings or touch the network (the host indexes the
app with whatever environment it has); see tests/unit/test_indexing.py.
"""

import azure.functions as func

from functions import (
    connect,
    directory,
    graph_subscriptions,
    graph_webhooks,
    health,
    keepalive,
    manage_connections,
    manage_links,
    manage_scopes,
    manage_status,
    manage_sync,
    sync_queues,
    teams_sync,
    zoom_webhook,
)

app = func.FunctionApp()

for blueprint in (health.bp, zoom_webhook.bp, sync_queues.bp, keepalive.bp, teams_sync.bp, manage_links.bp,
                  graph_webhooks.bp, graph_subscriptions.bp, connect.bp, manage_connections.bp,
                  directory.bp, manage_status.bp, manage_scopes.bp, manage_sync.bp):
    app.register_functions(blueprint)
