"""Timer: confirm overlays near expiry against their source; renew or release them."""

import azure.functions as func

bp = func.Blueprint()


@bp.timer_trigger(arg_name="timer", schedule="0 */5 * * * *", run_on_startup=False)
def overlay_keepalive(timer: func.TimerRequest) -> None:
    from shared.sync import keepalive_due

    keepalive_due()
