"""The pipeline task's callback client: what the activities build from the callback values.

The calls live in the modules of their job (plan.py: events, feed, log, timeline record;
test_results.py; summary.py); this class puts them behind one object so a caller holds one
client per pipeline task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from notebookops.devops import summary, test_results
from notebookops.devops.plan import PlanCalls

__all__ = ["DevOpsClient"]


class DevOpsClient(PlanCalls):
    """One pipeline task's callback: build it from the callback values and call it directly.

    ``disabled`` maps side-call kinds (SIDE_CALLS) to the reason they were turned off; pass the
    mapping an earlier activity returned so a rejected kind stays off for the whole run, and
    read ``newly_disabled`` after the calls to hand it on.
    """

    def attach_summary(self, markdown: str, name: str = "notebookops.md") -> bool:
        return summary.attach_summary(self, markdown, name)

    def publish_test_results(
        self,
        run_summary: Mapping[str, Any],
        resolve_output: Callable[[Mapping[str, Any]], str | Path | None] | None = None,
    ) -> int | None:
        """One Azure DevOps test run for the build, one result per notebook; best effort.

        Returns the test run id, or None without a build id or when publishing failed (logged).
        """
        return test_results.publish_test_results(self, run_summary, resolve_output)
