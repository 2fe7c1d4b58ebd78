"""The HTTP views in-process: /events/ answers and headers, the job endpoints, CSRF."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from django.test import Client, override_settings

from myapp.publish import send_event, user_channel
from tests.sse_client import SSEParser

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def users():
    model = get_user_model()
    return model.objects.create_user("alice", password="pw-alice-123"), model.objects.create_user(
        "bob", password="pw-bob-123"
    )


@pytest.fixture
def alice(users):
    client = Client(enforce_csrf_checks=True)
    client.force_login(users[0])
    return client


def read(response, parser):
    return parser.feed(next(response.streaming_content))


def test_anonymous_stream_is_refused_with_401(memory_broker):
    """An anonymous /events/ gets 401 with a reason, never an empty 200."""
    response = Client().get("/events/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert "log in" in json.loads(response.content)["error"]


def test_stream_headers_first_frame_and_live_event(memory_broker, alice, users):
    """200 text/event-stream, no-cache, unbuffered; a stream.open block with the retry first; then live events."""
    response = alice.get("/events/")
    try:
        assert response.status_code == 200
        assert response["Content-Type"] == "text/event-stream"
        assert response["Cache-Control"] == "no-cache"
        assert response["X-Accel-Buffering"] == "no"
        first = next(response.streaming_content)
        assert first.startswith(b"retry: ") and b"\nevent: stream.open\n" in first
        parser = SSEParser()
        (opened,) = parser.feed(first)
        expected = {"channels": [user_channel(users[0])], "resumed": False}
        assert (opened.type, json.loads(opened.data)) == ("stream.open", expected)
        assert 2000 <= parser.retry <= 4000
        event_id = send_event(user_channel(users[0]), "job.finished", {"job": 5})
        (message,) = read(response, parser)
        assert (message.type, message.data, message.last_event_id) == ("job.finished", '{"job":5}', event_id)
    finally:
        response.close()


def test_database_connection_released_before_streaming(memory_broker, alice):
    """The view closes its database connection before the stream starts."""
    response = alice.get("/events/")
    try:
        assert response.status_code == 200
        assert all(connection.connection is None for connection in connections.all())
    finally:
        response.close()


def test_stream_closed_by_the_response_leaves_the_hub(memory_broker, alice):
    """Closing the response unsubscribes, even if nothing was read."""
    from myapp.hub import get_hub

    response = alice.get("/events/")
    assert get_hub().stats()["streams"] == 1
    response.close()
    assert get_hub().stats()["streams"] == 0


def test_broker_down_gives_503_with_retry_after(settings, alice, tmp_path):
    """With the broker unreachable, /events/ answers 503 + Retry-After and send_event raises."""
    from myapp.exceptions import BrokerUnavailable

    settings.MYAPP_BROKER = {
        "BACKEND": "myapp.brokers.redis.RedisBroker",
        "OPTIONS": {"url": f"unix://{tmp_path}/nothing.sock", "socket_timeout": 1, "connect_timeout": 1},
    }
    response = alice.get("/events/")
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    with pytest.raises(BrokerUnavailable):
        send_event("room:x", "t", 1)


def test_start_job_needs_csrf_and_login(memory_broker, alice):
    """POST /jobs/ is CSRF-protected and needs a login (401 JSON, not a redirect)."""
    assert alice.post("/jobs/", {"source": "A,a@example.com"}).status_code == 403
    assert Client().post("/jobs/", {"source": "A,a@example.com"}).status_code == 401


def test_start_job_enqueues_a_task_for_the_owner(memory_broker, alice, users):
    """A valid POST creates the user's job and a queued task record."""
    from django_tasks_db.models import DBTaskResult

    from worker_tasks.models import ImportJob

    alice.get("/")  # sets the CSRF cookie
    token = alice.cookies["csrftoken"].value
    response = alice.post("/jobs/", {"source": "A,a@example.com"}, headers={"X-CSRFToken": token})
    assert response.status_code == 201
    job = ImportJob.objects.get(pk=response.json()["id"])
    assert job.owner == users[0]
    assert DBTaskResult.objects.get(id=job.task_id).task_path == "worker_tasks.tasks.import_contacts"


def test_start_job_refuses_empty_and_oversized_input(memory_broker, alice):
    """Empty or over-long CSV gets 400 with a reason."""
    alice.get("/")
    headers = {"X-CSRFToken": alice.cookies["csrftoken"].value}
    empty = alice.post("/jobs/", {"source": "  "}, headers=headers)
    huge = alice.post("/jobs/", {"source": "x" * 70000}, headers=headers)
    assert (empty.status_code, huge.status_code) == (400, 400)
    assert "CSV" in empty.json()["error"] and "65536" in huge.json()["error"]


def test_other_users_job_is_404(memory_broker, alice, users):
    """A user cannot see another user's job (404), as JSON or as a page."""
    from worker_tasks.models import ImportJob

    theirs = ImportJob.objects.create(owner=users[1], source="x")
    mine = ImportJob.objects.create(owner=users[0], source="x")
    assert alice.get(f"/jobs/{theirs.pk}/").status_code == 404
    assert alice.get(f"/jobs/{theirs.pk}/watch/").status_code == 404
    assert alice.get(f"/jobs/{mine.pk}/").json()["id"] == mine.pk
    assert [job["id"] for job in alice.get("/jobs/").json()["jobs"]] == [mine.pk]


def test_without_an_authorizer_only_the_users_own_channel_streams(memory_broker, alice, users):
    """With MYAPP_CHANNEL_AUTHORIZER = None (the default) every group channel is 403; the own channel streams."""
    own = user_channel(users[0])
    assert alice.get("/events/", {"channel": "room:lobby", "check": "1"}).status_code == 200, "the demo admits rooms"
    with override_settings(MYAPP_CHANNEL_AUTHORIZER=None):
        for channel in ("room:lobby", "job:1", "team:blue", "status:public"):
            for params in ({"channel": channel}, {"channel": channel, "check": "1"}, {"channel": [own, channel]}):
                response = alice.get("/events/", params)
                assert response.status_code == 403, params
                assert json.loads(response.content)["error"] == f"not allowed to read channel {channel!r}"
        for params in ({}, {"channel": own}):
            response = alice.get("/events/", params)
            try:
                assert response.status_code == 200
                parser = SSEParser()
                (opened,) = read(response, parser)
                assert json.loads(opened.data)["channels"] == [own]
                event_id = send_event(own, "note", "only yours")
                (message,) = read(response, parser)
                assert (message.type, message.data, message.last_event_id) == ("note", '"only yours"', event_id)
            finally:
                response.close()


def test_overlong_last_event_id_resets_the_stream(memory_broker, alice):
    """A Last-Event-ID over 256 characters is not parsed: the stream opens with stream.reset "malformed"."""
    for headers, params in (({"Last-Event-ID": "1-0" + "0" * 254}, {}), ({}, {"lastEventId": "7" * 257})):
        response = alice.get("/events/", params, headers=headers)
        try:
            assert response.status_code == 200
            (reset,) = read(response, SSEParser())
            assert (reset.type, json.loads(reset.data)) == ("stream.reset", {"reason": "malformed"})
        finally:
            response.close()


def test_overlong_token_is_refused_unchecked(memory_broker):
    """A subscription token over MAX_TOKEN_LENGTH (4096) characters gets 401 "token too long"."""
    from myapp.tokens import MAX_TOKEN_LENGTH

    response = Client().get("/events/", {"token": "a" * (MAX_TOKEN_LENGTH + 1)})
    assert response.status_code == 401
    assert json.loads(response.content)["error"] == "invalid subscription token: token too long"
    assert "bad signature" in json.loads(Client().get("/events/", {"token": "a" * MAX_TOKEN_LENGTH}).content)["error"]


def test_stream_limit_counts_users_not_tokens(memory_broker, alice, settings):
    """MYAPP_MAX_STREAMS_PER_USER limits a logged-in user's streams; anonymous token streams are never counted."""
    from myapp.tokens import subscription_token

    settings.MYAPP_MAX_STREAMS_PER_USER = 1
    token = subscription_token(["status:public"])
    opened = []
    try:
        for _ in range(3):
            opened.append(Client().get("/events/", {"token": token}))
            assert opened[-1].status_code == 200, "a shared public token serves any number of viewers"
        opened.append(alice.get("/events/"))
        assert opened[-1].status_code == 200
        second = alice.get("/events/")
        assert second.status_code == 429 and second["Retry-After"] == "5"
    finally:
        for response in opened:
            response.close()
