"""/api/manage/status (JSON) and /api/manage (the status page, HTML): admin key."""

import azure.functions as func

from functions.http_util import json_response, not_configured

bp = func.Blueprint()


@bp.route(route="manage/status", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def manage_status(req: func.HttpRequest) -> func.HttpResponse:
    from shared.config import SettingMissing
    from shared.status import get_status

    try:
        return json_response(*get_status(dict(req.params)))
    except SettingMissing as exc:
        return not_configured(exc)


@bp.route(route="manage", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def manage_page(req: func.HttpRequest) -> func.HttpResponse:
    from shared.admin_page import page_response, redirect_to_canonical
    from shared.config import SettingMissing

    canonical = redirect_to_canonical(req.url)
    if canonical is not None:
        return func.HttpResponse(status_code=308, headers={"Location": canonical, "Cache-Control": "no-store"})
    try:
        status, body, headers = page_response(dict(req.params))
    except SettingMissing as exc:
        return not_configured(exc)
    return func.HttpResponse(body, status_code=status, headers=headers, mimetype="text/html", charset="utf-8")
