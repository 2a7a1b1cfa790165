"""/api/manage/scopes: the enablement scopes (directions on/off, scope groups), admin key."""

import azure.functions as func

from functions.http_util import json_response, not_configured

bp = func.Blueprint()


@bp.route(route="manage/scopes", methods=["GET", "PUT", "DELETE"], auth_level=func.AuthLevel.ADMIN)
def manage_scopes(req: func.HttpRequest) -> func.HttpResponse:
    from shared import scopes
    from shared.config import SettingMissing

    try:
        if req.method == "PUT":
            return json_response(*scopes.put_scopes(req.get_body()))
        if req.method == "DELETE":
            return json_response(*scopes.delete_scopes())
        return json_response(*scopes.get_scopes_response())
    except SettingMissing as exc:
        return not_configured(exc)
