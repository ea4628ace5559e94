"""The deterministic notebook orchestrator (all policy lives in notebookops)."""

import azure.durable_functions as df

from notebookops.orchestration import orchestrator

bp = df.Blueprint()


@bp.function_name("OrchestratorFunction")
@bp.orchestration_trigger(context_name="context")
def orchestrator_function(context: df.DurableOrchestrationContext):
    return (yield from orchestrator(context))
