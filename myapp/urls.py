"""The push service's URLs, namespaced ``myapp``: ``path("", include("myapp.urls"))``.

- ``events/`` (``myapp:events``): the SSE stream;
- ``api/events/`` (``myapp:publish``): the publish API;
- ``api/events/batch/`` (``myapp:publish-batch``): the publish API for a list of events;
- ``api/control/`` (``myapp:control``): end a user's open streams (``myapp.control``);
- ``healthz`` (``myapp:healthz``): this worker's hub, for load balancers;
- ``metrics`` (``myapp:metrics``): Prometheus metrics of every worker, for a
  scraper holding MYAPP_METRICS_TOKEN (404 while that is unset).
"""

from django.urls import path

from .views import api, control, events, health, metrics

app_name = "myapp"

urlpatterns = [
    path("events/", events.events, name="events"),
    path("api/events/", api.publish, name="publish"),
    path("api/events/batch/", api.publish_batch, name="publish-batch"),
    path("api/control/", control.control, name="control"),
    path("healthz", health.healthz, name="healthz"),
    path("metrics", metrics.metrics, name="metrics"),
]
