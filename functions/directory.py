"""Directory matching, enablement scopes and Zoom user lifecycle: timers and queue workers."""

import azure.functions as func

from shared.names import DIRECTORY_QUEUE, ZOOM_USERS_QUEUE

bp = func.Blueprint()


@bp.timer_trigger(arg_name="timer", schedule="0 0 3 * * *", run_on_startup=False)
def directory_matching(timer: func.TimerRequest) -> None:
    from shared.matching import start_from_timer

    start_from_timer("timer")


@bp.timer_trigger(arg_name="timer", schedule="0 */15 * * * *", run_on_startup=False)
def scopes_apply(timer: func.TimerRequest) -> None:
    from shared.scopes import start_and_run

    start_and_run("timer")


@bp.queue_trigger(arg_name="msg", queue_name=DIRECTORY_QUEUE, connection="AzureWebJobsStorage")
def directory_worker(msg: func.QueueMessage) -> None:
    from shared.matching import handle_directory_message
    from shared.queue_messages import run_queue_message

    # A run caught by an outage waits it out in rounds (not the poison queue, which would leave it
    # "running" for a day): it resumes from its checkpoint, or is dropped if a newer run took over.
    run_queue_message(DIRECTORY_QUEUE, msg.get_body(), msg.dequeue_count, handle_directory_message,
                      outage_retries=True)


@bp.queue_trigger(arg_name="msg", queue_name=ZOOM_USERS_QUEUE, connection="AzureWebJobsStorage")
def zoom_user_worker(msg: func.QueueMessage) -> None:
    from shared.matching import handle_user_event
    from shared.queue_messages import run_queue_message

    # Likewise a lifecycle event; one that comes back late is still ordered by its event_ts.
    run_queue_message(ZOOM_USERS_QUEUE, msg.get_body(), msg.dequeue_count, handle_user_event,
                      outage_retries=True)
