"""/api/connect/...: OAuth connect flows for Microsoft and Zoom accounts, and disconnecting.

Anonymous at the host: people are authenticated by Entra or Zoom sign-in, the ``state``
parameter and a signed browser-binding cookie; connecting a sync account needs an admin-issued
one-time invitation (shared/connect/flows.py).
"""

import azure.functions as func

bp = func.Blueprint()


def _request(req: func.HttpRequest):
    from shared.pages import WebRequest

    return WebRequest(method=req.method, params=dict(req.params), body=req.get_body() or b"",
                      headers={k.lower(): v for k, v in req.headers.items()})


def _reply(resp) -> func.HttpResponse:
    return func.HttpResponse(resp.body, status_code=resp.status, headers=resp.headers, mimetype=resp.content_type,
                             charset="utf-8")


@bp.route(route="connect/microsoft/start", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_microsoft_start(req: func.HttpRequest) -> func.HttpResponse:
    from shared.connect import flows

    return _reply(flows.microsoft_start(_request(req)))


# GET: Entra's default (response_mode=query); POST: accepted too, should a form_post response arrive.
@bp.route(route="connect/microsoft/callback", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_microsoft_callback(req: func.HttpRequest) -> func.HttpResponse:
    from shared.connect import flows

    return _reply(flows.microsoft_callback(_request(req)))


@bp.route(route="connect/zoom/start", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_zoom_start(req: func.HttpRequest) -> func.HttpResponse:
    from shared.connect import flows

    return _reply(flows.zoom_start(_request(req)))


@bp.route(route="connect/zoom/callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_zoom_callback(req: func.HttpRequest) -> func.HttpResponse:
    from shared.connect import flows

    return _reply(flows.zoom_callback(_request(req)))


@bp.route(route="connect/{provider}/disconnect", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_disconnect(req: func.HttpRequest) -> func.HttpResponse:
    from shared.connect import flows

    return _reply(flows.disconnect(req.route_params.get("provider", ""), _request(req)))
