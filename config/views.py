"""The demo's pages: start contact imports and watch them live (the push service's first user)."""

from functools import wraps

from django.http import Http404, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_http_methods

from myapp.publish import user_channel
from worker_tasks.models import ImportJob
from worker_tasks.tasks import import_contacts

SAMPLE_CSV = "\n".join(
    [
        "Ada Lovelace,ada@example.com",
        "Alan Turing,alan@example.com",
        "Grace Hopper,grace@example.com",
        "Edsger Dijkstra,edsger@example.com",
        "Barbara Liskov,barbara@example.com",
        "Donald Knuth,don@example.com",
        "Margaret Hamilton,margaret@example.com",
        "Ken Thompson,ken@example.com",
    ]
)
#: Characters of CSV one import may send.
MAX_SOURCE_LENGTH = 65536


def error(status, reason):
    """Return ``{"error": reason}`` as JSON with ``status``."""
    return JsonResponse({"error": reason}, status=status)


def login_required_json(view):
    """Like login_required, but answer 401 JSON instead of redirecting."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return error(401, "log in first")
        return view(request, *args, **kwargs)

    return wrapper


def _own_job(request, job_id):
    try:
        return ImportJob.objects.get(pk=job_id, owner=request.user)
    except ImportJob.DoesNotExist:
        raise Http404("no such job") from None


@require_GET
def index(request):
    if not request.user.is_authenticated:
        from django.contrib.auth.views import redirect_to_login

        return redirect_to_login(request.get_full_path())
    jobs = ImportJob.objects.filter(owner=request.user)[:20]
    return render(
        request,
        "demo/index.html",
        {"jobs": jobs, "channel": user_channel(request.user), "sample_csv": SAMPLE_CSV},
    )


@require_http_methods(["GET", "POST"])
@login_required_json
def jobs(request):
    """GET: the user's latest jobs. POST (CSRF-protected form field ``source``): start an import."""
    if request.method == "GET":
        return JsonResponse({"jobs": [job.as_dict() for job in ImportJob.objects.filter(owner=request.user)[:50]]})
    source = request.POST.get("source", "")
    if not source.strip():
        return error(400, "paste some CSV: name,email per line")
    if len(source) > MAX_SOURCE_LENGTH:
        return error(400, f"at most {MAX_SOURCE_LENGTH} characters per import")
    job = ImportJob.objects.create(owner=request.user, source=source)
    result = import_contacts.enqueue(job.pk)
    job.task_id = str(result.id)
    job.save(update_fields=["task_id"])
    return JsonResponse(job.as_dict(), status=201)


@require_GET
@login_required_json
def job_detail(request, job_id):
    """The job as JSON; 404 for another user's job."""
    return JsonResponse(_own_job(request, job_id).as_dict())


@require_GET
def job_page(request, job_id):
    """A page watching one job on its own channel; its stream ends after the job does."""
    if not request.user.is_authenticated:
        from django.contrib.auth.views import redirect_to_login

        return redirect_to_login(request.get_full_path())
    job = _own_job(request, job_id)
    return render(request, "demo/job.html", {"job": job})
