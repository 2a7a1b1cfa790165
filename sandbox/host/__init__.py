"""Building blocks of the local Functions host (``sandbox.functions_host``).

host.json and app settings, HTTP route templates, timer schedules, function indexing and the
queue listener, each written to the Azure Functions host's documented behaviour.
"""
