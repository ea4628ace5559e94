"""The Azure Functions entry point: one blueprint per function folder, nothing else."""

import azure.durable_functions as df
import azure.functions as func

from ActivityClone import bp as activity_clone
from ActivityMonitor import bp as activity_monitor
from ActivityReport import bp as activity_report
from ActivitySubmit import bp as activity_submit
from AzureMLEvents import bp as azureml_events
from HttpStarter import bp as http_starter
from OrchestratorFunction import bp as orchestrator_function
from RunStatus import bp as run_status
from ServiceBusStarter import bp as service_bus_starter

app = df.DFApp(http_auth_level=func.AuthLevel.FUNCTION)

for blueprint in (
    service_bus_starter,
    orchestrator_function,
    activity_clone,
    activity_submit,
    activity_monitor,
    activity_report,
    http_starter,
    run_status,
    azureml_events,
):
    app.register_functions(blueprint)
