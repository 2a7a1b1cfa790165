"""/api/manage/links/sync (start directory matching) and /api/manage/links/{id}/resync: admin key."""

import azure.functions as func

from functions.http_util import json_response, not_configured

bp = func.Blueprint()


@bp.route(route="manage/links/sync", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
def manage_links_sync(req: func.HttpRequest) -> func.HttpResponse:
    from shared import matching
    from shared.config import SettingMissing

    try:
        return json_response(*matching.request_run("admin", req.get_body()))
    except SettingMissing as exc:
        return not_configured(exc)


@bp.route(route="manage/links/{zoom_user_id}/resync", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
def manage_link_resync(req: func.HttpRequest) -> func.HttpResponse:
    from shared import admin
    from shared.config import SettingMissing

    try:
        return json_response(*admin.resync_link(req.route_params.get("zoom_user_id", "")))
    except SettingMissing as exc:
        return not_configured(exc)
