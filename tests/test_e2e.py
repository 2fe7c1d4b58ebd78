"""The main job end to end on the real stack (gunicorn + gevent, db_worker, Redis or PostgreSQL)."""

import json

import pytest
import requests

from tests.sse_client import SSEClient

pytestmark = pytest.mark.e2e

CSV = "\n".join(f"Person {n},person{n}@example.com" for n in range(1, 7))


def start_job(session, stack, source=CSV):
    return stack.start_job(session, source)


def job_events(client, job_id):
    return [
        (m.type, json.loads(m.data))
        for m in client.messages
        if m.type.startswith("job.") and json.loads(m.data)["job"] == job_id
    ]


def finished(job_id, kind="job.finished"):
    return lambda messages: any(m.type == kind and json.loads(m.data)["job"] == job_id for m in messages)


def test_job_progress_then_finished_reach_the_stream(stack):
    """Progress events arrive in increasing order, then job.finished with the result summary."""
    session = stack.login("alice")
    client = SSEClient(session, stack.url + "/events/")
    try:
        assert client.status == 200
        client.wait_count("stream.open", 1)
        job = start_job(session, stack)
        client.wait_for(finished(job["id"]), timeout=30, what="job.finished")
        events = job_events(client, job["id"])
        percents = [data["percent"] for kind, data in events if kind == "job.progress"]
        assert percents == sorted(percents) and percents[0] == 0 and percents[-1] == 100
        assert len(percents) == 7, "one event at start and one per row"
        assert events[-1] == ("job.finished", {"job": job["id"], "result": {"imported": 6, "skipped": 0}})
        detail = session.get(f"{stack.url}/jobs/{job['id']}/").json()
        assert (detail["status"], detail["percent"], detail["imported"]) == ("finished", 100, 6)
    finally:
        client.close()


def test_failing_job_reports_its_error_and_a_failed_task_record(stack):
    """A job that raises publishes job.failed with the message; its task record is FAILED."""
    session = stack.login("alice")
    client = SSEClient(session, stack.url + "/events/")
    try:
        client.wait_count("stream.open", 1)
        job = start_job(session, stack, "Ok,ok@example.com\nBroken,not-an-email")
        client.wait_for(finished(job["id"], "job.failed"), timeout=30, what="job.failed")
        kind, data = job_events(client, job["id"])[-1]
        assert (kind, data) == (
            "job.failed",
            {"job": job["id"], "error": "row 2: 'not-an-email' is not a valid email address"},
        )
        detail = session.get(f"{stack.url}/jobs/{job['id']}/").json()
        assert detail["status"] == "failed" and "row 2" in detail["error"]
        task_id = detail["id"]
        output = stack.manage(
            "shell",
            "--no-imports",
            "-c",
            "from worker_tasks.models import ImportJob; from django_tasks_db.models import DBTaskResult; "
            f"print(DBTaskResult.objects.get(id=ImportJob.objects.get(pk={task_id}).task_id).status)",
        ).stdout.strip()
        assert output == "FAILED"
    finally:
        client.close()


def test_two_streams_of_a_user_receive_and_another_user_does_not(stack):
    """Both of a user's streams get their events; another user's stream gets none of them."""
    alice, bob = stack.login("alice"), stack.login("bob")
    streams = [SSEClient(alice, stack.url + "/events/"), SSEClient(alice, stack.url + "/events/")]
    other = SSEClient(bob, stack.url + "/events/")
    try:
        for client in [*streams, other]:
            client.wait_count("stream.open", 1)
        job = start_job(alice, stack, "One,one@example.com")
        for client in streams:
            client.wait_for(finished(job["id"]), timeout=30, what="job.finished")
        bob_job = start_job(bob, stack, "Two,two@example.com")
        other.wait_for(finished(bob_job["id"]), timeout=30, what="bob's own job.finished")
        assert job_events(other, job["id"]) == [], "bob saw none of alice's events"
        assert all(job_events(client, bob_job["id"]) == [] for client in streams)
    finally:
        for client in [*streams, other]:
            client.close()


def test_anonymous_and_foreign_requests_are_refused(stack):
    """Anonymous streams get 401; another user's job is 404; a job page for it too."""
    assert requests.get(stack.url + "/events/", timeout=5).status_code == 401
    alice, bob = stack.login("alice"), stack.login("bob")
    job = start_job(alice, stack, "One,one@example.com")
    assert bob.get(f"{stack.url}/jobs/{job['id']}/").status_code == 404
    assert bob.get(f"{stack.url}/events/?channel=job:{job['id']}").status_code == 403
