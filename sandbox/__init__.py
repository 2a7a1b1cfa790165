"""The local world presence-bridge runs in on a laptop and in every end-to-end test.

Azurite for storage, emulators of Zoom and Entra/Graph that follow the vendors' documented
behaviour, and a local Functions host that serves ``function_app.app`` like the real one.
"""
