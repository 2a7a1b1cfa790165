"""Connecting accounts: the OAuth connect flows for Microsoft and Zoom, self-service links,
disconnecting, and the admin view of connected accounts.

- :mod:`shared.connect.flows`: the browser flows behind ``/api/connect/...``.
- :mod:`shared.connect.state`: flow records, the browser-binding cookie, invitations, tickets.
- :mod:`shared.connect.people`: self links, releasing them, removing a connected account.
- :mod:`shared.connect.zoom_oauth`: Zoom user-level OAuth, only to identify a person.
- :mod:`shared.connect.manage`: the admin API (``/api/manage/connections``).

The tokens themselves live in :mod:`shared.connections`.
"""
