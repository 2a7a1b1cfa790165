"""GET /api/health: liveness and dependency checks, never secrets."""

import json

import azure.functions as func

from shared.health import check_health

bp = func.Blueprint()


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    report = check_health()
    status = 200 if report["status"] == "ok" else 503
    return func.HttpResponse(json.dumps(report), status_code=status, mimetype="application/json")
