"""``GET /metrics``: the Prometheus exposition of ``myapp.metrics``, for a scraper holding the token.

Answers: 404 while metrics are off (MYAPP_METRICS_TOKEN is None, the
default: the URL looks like any unknown one); 401 without
``Authorization: Bearer <token>``; 403 for a wrong token (compared in
constant time, never logged); 405 for a method other than GET; else 200
with every metric, summed over gunicorn's workers, in the text format (or
OpenMetrics when the ``Accept`` header asks for it), never cached.

Prometheus sends the token with ``authorization: {credentials: <token>}``
(or ``bearer_token`` in old versions) in its scrape config.
"""

from django.http import Http404, HttpResponse

from myapp import metrics as service_metrics
from myapp.conf import setting

from .bearer import bearer_token, token_matches
from .responses import error

__all__ = ["metrics"]


def metrics(request):
    """Serve the metrics to a scraper that sends the MYAPP_METRICS_TOKEN."""
    expected = setting("MYAPP_METRICS_TOKEN")
    if expected is None:
        raise Http404("metrics are off")
    token = bearer_token(request)
    if token is None:
        return error(401, "send Authorization: Bearer <token>", {"WWW-Authenticate": 'Bearer realm="metrics"'})
    if not token_matches(token, [expected]):
        return error(403, "invalid metrics token")
    if request.method != "GET":
        return error(405, "use GET", {"Allow": "GET"})
    body, content_type = service_metrics.exposition(request.headers.get("Accept"))
    response = HttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
