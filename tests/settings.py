"""The demo's settings for the in-process tests, plus the PostgreSQL broker's app.

The broker contract suite switches between all three backends within one
test database, so the PostgreSQL broker's tables must exist whatever
MYAPP_BROKER_BACKEND says. Subprocess tests (the live stack, the install
test) use the real settings.
"""

from config.settings import *  # noqa: F403
from config.settings import INSTALLED_APPS

if "myapp.brokers.postgres" not in INSTALLED_APPS:
    INSTALLED_APPS = [*INSTALLED_APPS, "myapp.brokers.postgres"]
