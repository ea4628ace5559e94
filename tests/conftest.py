"""Shared test settings.

Hypothesis explores new examples on every local run, but CI must give the same verdict for
the same commit: there it replays a fixed sequence (derandomize) and keeps no database.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Fixtures shared by the end-to-end flow tests.
from tests.flow_support import flow_env  # noqa: E402, F401
