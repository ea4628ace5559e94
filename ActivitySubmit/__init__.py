"""ActivitySubmit: see notebookops.activities.submit.

It binds a durable client only to learn where this instance takes events (its send-event
URL), so a backend whose runner announces its own end (local) can wake the orchestration.
The binding is declared as a plain durableClient input: the SDK's `durable_client_input`
would make the activity async, and a submit blocks (git, the backend's SDK)."""

import azure.durable_functions as df

from notebookops import activities, run_events

bp = df.Blueprint()


@bp.function_name("ActivitySubmit")
@bp.activity_trigger(input_name="payload")
@bp.generic_input_binding(arg_name="client", type="durableClient")
def activity_submit(payload: dict, client: str) -> dict:
    return activities.submit(payload, run_events.send_event_url(client, payload.get("instanceId")))
