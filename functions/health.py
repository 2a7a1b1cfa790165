"""GET /api/health: liveness and dependency checks, never secrets."""

import azure.functions as func

from functions.http_util import json_response

bp = func.Blueprint()


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    from shared.health import check_health

    report = check_health()
    return json_response(200 if report["status"] == "ok" else 503, report)
