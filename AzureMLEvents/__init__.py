"""Azure ML run events from Event Grid wake the orchestration that waits for the run."""

import azure.durable_functions as df
import azure.functions as func

from notebookops import run_events

bp = df.Blueprint()


@bp.function_name("AzureMLEvents")
@bp.event_grid_trigger(arg_name="event")
@bp.durable_client_input(client_name="client")
async def azureml_events(event: func.EventGridEvent, client: df.DurableOrchestrationClient) -> None:
    await run_events.deliver(event.event_type, event.subject, event.get_json(), client)
