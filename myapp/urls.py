"""The push service's URLs, namespaced ``myapp``: ``path("", include("myapp.urls"))``.

- ``events/`` (``myapp:events``): the SSE stream;
- ``api/events/`` (``myapp:publish``): the publish API;
- ``api/events/batch/`` (``myapp:publish-batch``): the publish API for a list of events;
- ``healthz`` (``myapp:healthz``): this worker's hub, for load balancers.
"""

from django.urls import path

from .views import api, events, health

app_name = "myapp"

urlpatterns = [
    path("events/", events.events, name="events"),
    path("api/events/", api.publish, name="publish"),
    path("api/events/batch/", api.publish_batch, name="publish-batch"),
    path("healthz", health.healthz, name="healthz"),
]
