"""Settings for the whole suite.

The suite runs on busy machines (CI runners, laptops building other things),
so nothing here may depend on how fast a machine is. Hypothesis by default
fails an example that takes over 200 ms and a test whose data takes long to
generate; neither says anything about pigeon, so both are off everywhere.
Tests that need more time than pytest's default timeout say so themselves.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "pigeon",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pigeon"))
