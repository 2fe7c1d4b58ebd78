"""The project's URLs plus the baseline stream at ``/baseline/events/``."""

from django.urls import path

from bench import baseline
from config.urls import urlpatterns as project_urlpatterns

urlpatterns = [
    path("baseline/events/", baseline.events, name="baseline-events"),
    *project_urlpatterns,
]
