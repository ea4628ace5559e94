"""ActivityClone: see notebookops.activities.clone."""

import azure.durable_functions as df

from notebookops import activities

bp = df.Blueprint()


@bp.function_name("ActivityClone")
@bp.activity_trigger(input_name="payload")
def activity_clone(payload: dict) -> dict:
    return activities.clone(payload)
