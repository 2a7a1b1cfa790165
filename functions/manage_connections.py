"""/api/manage/connections: connected accounts for the admin (admin key): list them a page at a
time (no token material), issue a one-time invitation to connect a sync account, disconnect one."""

import azure.functions as func

from functions.http_util import json_response, not_configured

bp = func.Blueprint()


@bp.route(route="manage/connections", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def manage_list_connections(req: func.HttpRequest) -> func.HttpResponse:
    from shared.config import SettingMissing
    from shared.connect import manage

    try:
        return json_response(*manage.list_accounts(req.params.get("page_size"), req.params.get("continuation"),
                                                   req.params.get("purpose"), req.params.get("status")))
    except SettingMissing as exc:
        return not_configured(exc)


@bp.route(route="manage/connections/invitations", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
def manage_connection_invitation(req: func.HttpRequest) -> func.HttpResponse:
    from shared.config import SettingMissing
    from shared.connect import manage

    try:
        return json_response(*manage.create_invitation(req.get_body()))
    except SettingMissing as exc:
        return not_configured(exc)


@bp.route(route="manage/connections/{account_id}", methods=["DELETE"], auth_level=func.AuthLevel.ADMIN)
def manage_delete_connection(req: func.HttpRequest) -> func.HttpResponse:
    from shared.config import SettingMissing
    from shared.connect import manage

    try:
        return json_response(*manage.delete_account(req.route_params.get("account_id", "")))
    except SettingMissing as exc:
        return not_configured(exc)
