"""The demo site's URLs: Django's login pages, the push service, the import pages."""

from django.urls import include, path

from config import views

urlpatterns = [
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("myapp.urls")),
    path("", views.index, name="index"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/<int:job_id>/", views.job_detail, name="job-detail"),
    path("jobs/<int:job_id>/watch/", views.job_page, name="job-page"),
]
