"""``GET /healthz``: this worker's hub, for load balancers and the benchmark."""

import os

from django.http import JsonResponse
from django.views.decorators.http import require_GET

from myapp import gcwatch
from myapp.hub import get_hub


@require_GET
def healthz(request):
    """200 with the worker's stream counts and garbage-collector pauses, or 503 while the broker is down."""
    hub = get_hub()
    hub.available()  # a worker that just started answers once its first connection attempt ended
    stats = hub.stats()
    body = {"status": "ok" if stats["connected"] else "broker unavailable", "pid": os.getpid(), **stats}
    body["gc"] = gcwatch.stats()
    return JsonResponse(body, status=200 if stats["connected"] else 503)
