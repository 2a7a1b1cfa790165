"""Graph presence subscriptions: the maintenance timer and the lifecycle-notification worker."""

import azure.functions as func

from shared.names import GRAPH_LIFECYCLE_QUEUE

bp = func.Blueprint()


@bp.timer_trigger(arg_name="timer", schedule="0 */5 * * * *", run_on_startup=False)
def graph_subscriptions(timer: func.TimerRequest) -> None:
    from shared.connections import finish_key_rotation
    from shared.status import count_links_quietly
    from shared.subscriptions import maintain_subscriptions
    from shared.telemetry import refresh_gauges

    try:
        maintain_subscriptions()
    finally:
        count_links_quietly()  # a step of the link count the status page and the links gauge show
        finish_key_rotation()  # connections still under an older TOKEN_ENCRYPTION_KEY key, if any
        refresh_gauges()  # the gauges' figures (subscriptions, connections, links, poison queues)


@bp.queue_trigger(arg_name="msg", queue_name=GRAPH_LIFECYCLE_QUEUE, connection="AzureWebJobsStorage")
def graph_lifecycle_worker(msg: func.QueueMessage) -> None:
    from shared.queue_messages import run_queue_message
    from shared.subscriptions import handle_lifecycle_message

    # A renewal Graph cannot answer now (reauthorizationRequired) waits an outage out in rounds.
    run_queue_message(GRAPH_LIFECYCLE_QUEUE, msg.get_body(), msg.dequeue_count, handle_lifecycle_message,
                      outage_retries=True)
