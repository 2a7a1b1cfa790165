"""Teams → Zoom: the presence sweep (timer) and the worker applying Teams presence reports."""

import azure.functions as func

from shared.names import TEAMS_PRESENCE_QUEUE

bp = func.Blueprint()


@bp.timer_trigger(arg_name="timer", schedule="%PRESENCE_SWEEP_SCHEDULE%", run_on_startup=False)
def presence_sweep(timer: func.TimerRequest) -> None:
    from shared.sweep import sweep

    sweep()


@bp.queue_trigger(arg_name="msg", queue_name=TEAMS_PRESENCE_QUEUE, connection="AzureWebJobsStorage")
def teams_presence_worker(msg: func.QueueMessage) -> None:
    from shared.queue_messages import run_queue_message
    from shared.sweep import handle_teams_message

    run_queue_message(TEAMS_PRESENCE_QUEUE, msg.get_body(), msg.dequeue_count, handle_teams_message,
                      outage_retries=True)
