import azure.durable_functions as df
import azure.functions as func

app = df.DFApp()


@app.timer_trigger(schedule="0 */5 * * * *", arg_name="timer")
def Tick(timer: func.TimerRequest) -> None:
    return None
