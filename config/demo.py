"""The demo's channel authorizer (MYAPP_CHANNEL_AUTHORIZER in config/settings.py).

- ``job:<id>``: the job's owner only; GONE once the job has finished or failed
  (a page opened afterwards gets 204 and shows the stored result).
- ``room:staff``: staff users only (revoking the flag and calling
  ``myapp.control.unsubscribe(user, "room:staff")`` shows revocation at once);
- ``room:<name>``: any logged-in user (a shared dashboard or chat room).
- anything else: refused.
"""

from myapp.auth import GONE


def authorize_channel(request, channel):
    """Return True, False or GONE for ``channel`` (see the module docstring)."""
    from worker_tasks.models import ImportJob

    kind, _, name = channel.partition(":")
    if kind == "job":
        if not name.isdigit():
            return False
        job = ImportJob.objects.filter(pk=int(name), owner=request.user).only("status").first()
        if job is None:
            return False
        return GONE if job.done else True
    if channel == "room:staff":
        return request.user.is_authenticated and request.user.is_staff
    if kind == "room":
        return request.user.is_authenticated
    return False
