"""Answer 503 + Retry-After, not 500, while the database is unreachable."""

import logging

from django.db import InterfaceError, OperationalError

from myapp.views.responses import unavailable

log = logging.getLogger("myapp.views")


class DatabaseUnavailableMiddleware:
    """Turn a view's lost database connection into 503 with Retry-After.

    With the PostgreSQL broker the database is also the broker: during its
    restart, pages and APIs ask clients to retry instead of failing.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, (OperationalError, InterfaceError)):
            log.warning("%s %s: database unavailable: %s", request.method, request.path, exception)
            return unavailable("the database is unavailable; retry later")
        return None
