"""The demo's background job: import contacts from CSV text, step by step.

Each row takes IMPORT_STEP_SECONDS (a setting, seconds) so the progress bar
has time to move. Events, on the owner's channel and on the job's channel:

- ``job.progress``: ``{"job": id, "percent": 0-100, "done": rows, "total": rows}``
- ``job.finished``: ``{"job": id, "result": {"imported": n, "skipped": n}}``
- ``job.failed``: ``{"job": id, "error": "row 3: ..."}``

then ``stream.close`` on the job's channel, which ends pages watching only it.

Every event is published durably (``durable=True``, through the outbox of
the app ``myapp.outbox``), in the same transaction as the job's state it
reports: the job is FINISHED exactly when its ``job.finished`` is queued. A
broker outage while the job runs delays the events until the relay can
publish them; it never loses them and never fails the task.
"""

import csv
import io
import logging
import time

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.utils import timezone
from django_tasks import task

from myapp.publish import CLOSE_EVENT, send_event, user_channel

from .models import Contact, ImportJob

log = logging.getLogger("worker_tasks")

#: Rows one job may import.
MAX_ROWS = 1000


class BadRow(ValueError):
    """A row of the CSV cannot be imported; the message names the row."""


def parse_rows(source):
    """Return [(name, email)] from CSV text, or raise BadRow naming the bad row."""
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(source)), start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise BadRow(f"row {number}: expected 2 columns (name,email), got {len(row)}")
        name, email = (cell.strip() for cell in row)
        rows.append((number, name, email))
    if not rows:
        raise BadRow("no rows to import")
    if len(rows) > MAX_ROWS:
        raise BadRow(f"{len(rows)} rows; at most {MAX_ROWS} per import")
    return rows


def _publish(job, event_type, data):
    send_event(user_channel(job.owner_id), event_type, data, durable=True)
    send_event(job.channel, event_type, data, durable=True)


@task()
def import_contacts(job_id):
    """Import the CSV of ImportJob ``job_id``, publishing progress; raise on a bad row."""
    job = ImportJob.objects.get(pk=job_id)
    job.status = ImportJob.Status.RUNNING
    job.save(update_fields=["status"])
    step = settings.IMPORT_STEP_SECONDS
    try:
        rows = parse_rows(job.source)
        _publish(job, "job.progress", {"job": job.pk, "percent": 0, "done": 0, "total": len(rows)})
        for done, (number, name, email) in enumerate(rows, start=1):
            time.sleep(step)  # the slow part of a real import (an API call, a lookup)
            try:
                validate_email(email)
            except ValidationError:
                raise BadRow(f"row {number}: {email!r} is not a valid email address") from None
            _, created = Contact.objects.get_or_create(
                owner_id=job.owner_id, email=email.lower(), defaults={"name": name, "job": job}
            )
            if created:
                job.imported += 1
            else:
                job.skipped += 1
            job.percent = done * 100 // len(rows)
            progress = {"job": job.pk, "percent": job.percent, "done": done, "total": len(rows)}
            with transaction.atomic():
                job.save(update_fields=["imported", "skipped", "percent"])
                _publish(job, "job.progress", progress)
    except Exception as failure:
        job.status = ImportJob.Status.FAILED
        job.error = str(failure)
        job.finished = timezone.now()
        with transaction.atomic():
            job.save(update_fields=["status", "error", "finished"])
            _publish(job, "job.failed", {"job": job.pk, "error": job.error})
            send_event(job.channel, CLOSE_EVENT, {"job": job.pk}, durable=True)
        log.info("import job %s failed: %s", job.pk, failure)
        raise
    job.status = ImportJob.Status.FINISHED
    job.finished = timezone.now()
    result = {"imported": job.imported, "skipped": job.skipped}
    with transaction.atomic():
        job.save(update_fields=["status", "finished"])
        _publish(job, "job.finished", {"job": job.pk, "result": result})
        send_event(job.channel, CLOSE_EVENT, {"job": job.pk}, durable=True)
    return result
