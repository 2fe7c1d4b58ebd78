from django.urls import path

from .views import api, demo, events, health

urlpatterns = [
    path("events/", events.events, name="events"),
    path("api/events/", api.publish, name="publish"),
    path("healthz", health.healthz, name="healthz"),
    path("", demo.index, name="index"),
    path("jobs/", demo.jobs, name="jobs"),
    path("jobs/<int:job_id>/", demo.job_detail, name="job-detail"),
    path("jobs/<int:job_id>/watch/", demo.job_page, name="job-page"),
]
