"""POST /api/zoom/webhook: Zoom events in. The signature is the authentication."""

import azure.functions as func

from functions.http_util import json_response, not_configured

bp = func.Blueprint()


@bp.route(route="zoom/webhook", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def zoom_webhook(req: func.HttpRequest) -> func.HttpResponse:
    from shared.config import SettingMissing, get_settings
    from shared.storage import enqueue
    from shared.zoom_webhook import handle

    try:
        settings = get_settings()
        secrets = settings.zoom_webhook_secrets
    except SettingMissing as exc:
        return not_configured(exc)
    result = handle(
        dict(req.headers),
        req.get_body(),
        secrets=secrets,
        enqueue=enqueue,
        max_body_bytes=settings.zoom_webhook_max_body_bytes,
        max_skew_s=settings.zoom_webhook_max_skew_seconds,
        max_age_s=settings.zoom_webhook_max_age_seconds,
    )
    return json_response(result.status, result.body)
