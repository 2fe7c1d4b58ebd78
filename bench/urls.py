"""The project's URLs plus the baseline stream at ``/baseline/events/`` and the memory diagnostics."""

from django.urls import path

from bench import baseline, views
from config.urls import urlpatterns as project_urlpatterns

urlpatterns = [
    path("baseline/events/", baseline.events, name="baseline-events"),
    path("bench/memory/", views.memory, name="bench-memory"),
    *project_urlpatterns,
]
