"""Queue-triggered sync work: Zoom presence events, deferred and keep-alive reconciles."""

import azure.functions as func

from shared.names import RECONCILE_QUEUE, ZOOM_PRESENCE_QUEUE

bp = func.Blueprint()


@bp.queue_trigger(arg_name="msg", queue_name=ZOOM_PRESENCE_QUEUE, connection="AzureWebJobsStorage")
def zoom_presence_worker(msg: func.QueueMessage) -> None:
    from shared.queue_messages import run_queue_message
    from shared.sync import handle_zoom_presence

    run_queue_message(ZOOM_PRESENCE_QUEUE, msg.get_body(), msg.dequeue_count, handle_zoom_presence,
                      outage_retries=True)


@bp.queue_trigger(arg_name="msg", queue_name=RECONCILE_QUEUE, connection="AzureWebJobsStorage")
def reconcile_worker(msg: func.QueueMessage) -> None:
    from shared.queue_messages import run_queue_message
    from shared.sync import handle_reconcile, waits_out_outages

    run_queue_message(RECONCILE_QUEUE, msg.get_body(), msg.dequeue_count, handle_reconcile,
                      outage_retries=waits_out_outages)
