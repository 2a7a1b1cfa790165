"""/api/manage/links: create, read, list and delete user links (admin key).

DESIGN.md names this /api/admin/...; the Functions host reserves routes (and function names)
beginning with "admin" for its own admin API (azure-functions-host #1781, #7634), so the
app's administration lives under /api/manage/.
"""

import azure.functions as func

from functions.http_util import json_response, not_configured

bp = func.Blueprint()


@bp.route(route="manage/links", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def manage_list_links(req: func.HttpRequest) -> func.HttpResponse:
    from shared import admin
    from shared.config import SettingMissing

    try:
        return json_response(*admin.get_links(req.params.get("page_size"), req.params.get("continuation"),
                                              req.params.get("state"), req.params.get("direction")))
    except SettingMissing as exc:
        return not_configured(exc)


@bp.route(route="manage/links/{zoom_user_id}", methods=["GET", "PUT", "PATCH", "DELETE"],
          auth_level=func.AuthLevel.ADMIN)
def manage_link(req: func.HttpRequest) -> func.HttpResponse:
    from shared import admin
    from shared.config import SettingMissing

    zoom_user_id = req.route_params.get("zoom_user_id", "")
    try:
        if req.method == "PUT":
            return json_response(*admin.put_link(zoom_user_id, req.get_body()))
        if req.method == "DELETE":
            return json_response(*admin.remove_link(zoom_user_id))
        if req.method == "PATCH":
            from shared.scopes import patch_link

            return json_response(*patch_link(zoom_user_id, req.get_body()))
        return json_response(*admin.get_link(zoom_user_id))
    except SettingMissing as exc:
        return not_configured(exc)
