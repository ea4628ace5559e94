import azure.durable_functions as df

app = df.DFApp()


@app.activity_trigger(input_name="payload")
def Mismatch(data: str) -> str:  # the binding says "payload"
    return data
