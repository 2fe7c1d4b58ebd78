"""Settings for the benchmark's gunicorn: the project's settings plus the baseline view.

Used for every target (so the service under test differs from production only
by one extra URL) and with ``MYAPP_BROKER_BACKEND=redis`` for the baseline.
"""

import os

from config.settings import *  # noqa: F403
from config.settings import LOGGING

ROOT_URLCONF = "bench.urls"

#: The Valkey/Redis server of the baseline view (redis-py URL).
BENCH_BASELINE_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

# Log 5xx answers with their traceback (Django prints them only with DEBUG):
# the baseline's failures under load are evidence the report quotes.
LOGGING["loggers"]["django.request"] = {"handlers": ["console"], "level": "ERROR", "propagate": False}
