"""ActivityReport: see notebookops.activities.report."""

import azure.durable_functions as df

from notebookops import activities

bp = df.Blueprint()


@bp.function_name("ActivityReport")
@bp.activity_trigger(input_name="payload")
def activity_report(payload: dict) -> dict:
    return activities.report(payload)
