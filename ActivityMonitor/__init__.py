"""ActivityMonitor: see notebookops.activities.monitor."""

import azure.durable_functions as df

from notebookops import activities

bp = df.Blueprint()


@bp.function_name("ActivityMonitor")
@bp.activity_trigger(input_name="payload")
def activity_monitor(payload: dict) -> dict:
    return activities.monitor(payload)
