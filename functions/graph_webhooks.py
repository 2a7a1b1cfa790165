"""POST /api/graph/notifications and /api/graph/lifecycle: Graph change and lifecycle
notifications in (function key in ``?code=``; the validation handshake answers first)."""

import json

import azure.functions as func

bp = func.Blueprint()


def _reply(result) -> func.HttpResponse:
    if result.body is None:
        return func.HttpResponse(status_code=result.status)
    if isinstance(result.body, str):
        return func.HttpResponse(result.body, status_code=result.status, mimetype=result.content_type)
    return func.HttpResponse(json.dumps(result.body), status_code=result.status, mimetype="application/json")


@bp.route(route="graph/notifications", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def graph_notifications(req: func.HttpRequest) -> func.HttpResponse:
    from shared.graph_notifications import handle_notifications

    return _reply(handle_notifications(dict(req.params), req.get_body()))


@bp.route(route="graph/lifecycle", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def graph_lifecycle(req: func.HttpRequest) -> func.HttpResponse:
    from shared.graph_notifications import handle_lifecycle

    return _reply(handle_lifecycle(dict(req.params), req.get_body()))
