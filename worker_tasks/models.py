"""Records of the demo's import jobs and the contacts they create."""

from django.conf import settings
from django.db import models


class ImportJob(models.Model):
    """One "import contacts" run, owned by the user who started it."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        FINISHED = "finished"
        FAILED = "failed"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="import_jobs")
    source = models.TextField(help_text="CSV text: name,email per line")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    percent = models.PositiveSmallIntegerField(default=0)
    imported = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]

    @property
    def channel(self):
        """The job's own channel: its watchers' stream ends after the last event."""
        return f"job:{self.pk}"

    @property
    def done(self):
        return self.status in (self.Status.FINISHED, self.Status.FAILED)

    def as_dict(self):
        return {
            "id": self.pk,
            "status": self.status,
            "percent": self.percent,
            "imported": self.imported,
            "skipped": self.skipped,
            "error": self.error,
            "created": self.created.isoformat() if self.created else None,
            "finished": self.finished.isoformat() if self.finished else None,
        }


class Contact(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="contacts")
    job = models.ForeignKey(ImportJob, on_delete=models.CASCADE, related_name="contacts")
    name = models.CharField(max_length=200)
    email = models.EmailField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "email"], name="unique_contact_email_per_owner")]
