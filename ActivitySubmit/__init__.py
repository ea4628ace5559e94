"""ActivitySubmit: see notebookops.activities.submit."""

import azure.durable_functions as df

from notebookops import activities

bp = df.Blueprint()


@bp.function_name("ActivitySubmit")
@bp.activity_trigger(input_name="payload")
def activity_submit(payload: dict) -> dict:
    return activities.submit(payload)
