"""Reporting to the waiting Azure DevOps pipeline task, one module per job.

- transport.py: the REST client and its retries, the errors, the side-call rule;
- plan.py: plan events (TaskStarted, TaskCompleted), live feed, job log, timeline record;
- test_results.py: one test run per pipeline task, one result per notebook;
- summary.py: the summary tab (a Markdown record attachment);
- delivery.py: when TaskCompleted is tried again or given up (pure, used by the orchestrator);
- client.py: ``DevOpsClient``, all of the calls behind one object.

Nothing is imported here: the orchestrator imports ``delivery`` alone, without the HTTP stack.
"""
