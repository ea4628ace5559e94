"""Benchmark 3: start-up cost. `import function_app` in a fresh interpreter against
`import azure.durable_functions`, alternated so both see the same machine load."""

from __future__ import annotations

from bench.common import PYTHON, ROOT, Report, Sample, bench_env, run_cmd

HEAVY = ("azureml", "azure.ai.ml", "papermill", "git", "nbclient", "jupyter_client")


def run(report: Report, repeats: int = 10) -> dict:
    env = bench_env()
    app_cmd = [PYTHON, "-c", "import function_app"]
    sdk_cmd = [PYTHON, "-c", "import azure.durable_functions"]
    run_cmd(app_cmd, cwd=ROOT, env=env)  # warm the file cache and bytecode once
    run_cmd(sdk_cmd, cwd=ROOT, env=env)
    app, sdk = [], []
    for _ in range(repeats):
        app.append(run_cmd(app_cmd, cwd=ROOT, env=env)[0])
        sdk.append(run_cmd(sdk_cmd, cwd=ROOT, env=env)[0])
    app_s, sdk_s = Sample(app), Sample(sdk)
    probe = f"import sys, function_app; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = run_cmd([PYTHON, "-c", probe], cwd=ROOT, env=env)[1].stdout.strip()
    ratio = app_s.median / sdk_s.median
    print(f"  import function_app        {app_s.fmt(3)}")
    print(f"  import azure.durable_func. {sdk_s.fmt(3)}")
    print(f"  ratio {ratio:.2f}x; heavy modules loaded at import: {loaded or 'none'}")
    report.add(
        "3 start-up",
        "import function_app vs import azure.durable_functions",
        app_s.fmt(3),
        sdk_s.fmt(3),
        f"{ratio:.2f}x",
        "<= 1.5x, no heavy imports",
        ratio <= 1.5 and not loaded,
    )
    return {"app": app, "sdk": sdk, "ratio": ratio, "heavyLoaded": loaded}
