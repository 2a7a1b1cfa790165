"""The Functions app: registers the blueprints in functions/ and nothing else.

Importing this module must never read settings or touch the network (the host indexes the
app with whatever environment it has); see tests/unit/test_indexing.py.
"""

import azure.functions as func

from functions import admin_links, health, keepalive, sync_queues, zoom_webhook

app = func.FunctionApp()

for blueprint in (health.bp, zoom_webhook.bp, sync_queues.bp, keepalive.bp, admin_links.bp):
    app.register_functions(blueprint)
