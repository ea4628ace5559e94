"""Two function apps at module level: the host indexes one, so devhost refuses this app."""

import azure.durable_functions as df
import azure.functions as func

app = func.FunctionApp()
myApp = df.DFApp()


@app.route(route="ping")
def ping(req: func.HttpRequest) -> str:
    return "pong"


@myApp.activity_trigger(input_name="name")
def hello(name: str) -> str:
    return f"Hello {name}!"
