"""POST /api/events/: authentication, validation, limits, and never a 500 (in-process, memory broker)."""

import io
import json
import logging

import pytest
from django.test import Client, RequestFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myapp.brokers import get_broker
from myapp.exceptions import InvalidEvent
from myapp.ids import parse
from myapp.views.api import publish

TOKEN = "publish-token-for-tests-0123456789"
URL = "/api/events/"


@pytest.fixture(autouse=True)
def api_settings(settings, memory_broker):
    settings.MYAPP_PUBLISH_TOKENS = ["another-token-0123456789abcdef", TOKEN]
    settings.MYAPP_PUBLISH_MAX_BODY_BYTES = 65536


def post(body, token=TOKEN, content_type="application/json", **headers):
    if token is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    # CONTENT_TYPE explicitly: the test client drops it for empty bodies; real clients do not.
    return Client().post(URL, data=body, content_type=content_type, CONTENT_TYPE=content_type, **headers)


def stored(channel):
    return [(e.event_type, e.data) for e in get_broker().history([channel], 0).events]


def test_publishes_and_returns_the_event_id():
    """A valid request publishes the event and answers 200 with its id."""
    response = post({"channel": "room:a", "event_type": "chat.message", "data": {"text": "hi"}})
    assert response.status_code == 200
    assert parse(response.json()["id"]) == get_broker().last_position()
    assert stored("room:a") == [("chat.message", '{"text":"hi"}')]


def test_publisher_id_makes_retries_safe():
    """Repeating a request with the same id returns the same event id and publishes once."""
    body = {"channel": "room:a", "event_type": "t", "data": 1, "id": "retry-me"}
    first, again = post(body), post(body)
    assert first.json() == again.json()
    assert len(stored("room:a")) == 1


def test_raw_text_data():
    """raw: true sends a string as is."""
    assert post({"channel": "room:a", "event_type": "t", "data": "line 1\nline 2", "raw": True}).status_code == 200
    assert stored("room:a") == [("t", "line 1\nline 2")]


@pytest.mark.parametrize(
    ("token", "status"),
    [(None, 401), ("", 401), ("wrong-token", 403), (TOKEN + "x", 403), (TOKEN[:-1], 403)],
    ids=["missing", "empty", "wrong", "longer", "shorter"],
)
def test_missing_or_wrong_token(token, status):
    """No bearer token: 401 with WWW-Authenticate; a wrong one: 403; nothing is published."""
    response = post({"channel": "room:a", "event_type": "t", "data": 1}, token=token)
    assert response.status_code == status
    if status == 401:
        assert response["WWW-Authenticate"].startswith("Bearer")
    assert stored("room:a") == []


def test_disabled_when_no_token_is_configured(settings):
    """With MYAPP_PUBLISH_TOKENS empty, every token is refused."""
    settings.MYAPP_PUBLISH_TOKENS = []
    assert post({"channel": "room:a", "event_type": "t", "data": 1}).status_code == 403


def test_tokens_are_compared_in_constant_time(monkeypatch):
    """Every configured token is compared with hmac.compare_digest, with no early exit."""
    import hmac

    from myapp.views import bearer

    calls = []
    real = hmac.compare_digest

    def spy(given, expected):
        calls.append(expected)
        return real(given, expected)

    monkeypatch.setattr(bearer.hmac, "compare_digest", spy)
    post({"channel": "room:a", "event_type": "t", "data": 1})
    assert len(calls) == 2, "both tokens compared, though the second one matched"


def test_tokens_never_reach_the_logs(caplog, settings):
    """Neither a right nor a wrong token appears in any log record, even when publishing fails."""
    settings.MYAPP_BROKER = {
        "BACKEND": "myapp.brokers.redis.RedisBroker",
        "OPTIONS": {"url": "unix:///nonexistent.sock"},
    }
    with caplog.at_level(logging.DEBUG):
        assert post({"channel": "room:a", "event_type": "t", "data": 1}).status_code == 503
        post({"channel": "room:a", "event_type": "t", "data": 1}, token="wrong-secret-value")
    assert TOKEN not in caplog.text and "wrong-secret-value" not in caplog.text
    assert "publish API: broker unavailable" in caplog.text


def test_other_methods_are_405():
    """GET and friends get 405 with Allow."""
    response = Client().get(URL, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert (response.status_code, response["Allow"]) == (405, "POST")


def test_csrf_does_not_apply_but_applies_elsewhere():
    """The API is token-authenticated (no CSRF token needed); other POSTs still need one."""
    client = Client(enforce_csrf_checks=True)
    body = json.dumps({"channel": "room:a", "event_type": "t", "data": 1})
    ok = client.post(URL, body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert ok.status_code == 200
    assert client.post("/accounts/login/", {"username": "x", "password": "y"}).status_code == 403


BAD_BODIES = [
    ("not JSON", b"{nope", 400, "not valid JSON"),
    ("invalid UTF-8", b'{"channel": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("empty body", b"", 400, "the body is empty"),
    ("a list", b"[1, 2]", 400, "must be a JSON object"),
    ("missing data", {"channel": "room:a", "event_type": "t"}, 400, "missing field: data"),
    ("unknown field", {"channel": "room:a", "event_type": "t", "data": 1, "evil": 1}, 400, "unknown fields: evil"),
    ("channel not a string", {"channel": 5, "event_type": "t", "data": 1}, 400, "field channel has the wrong type"),
    ("raw not a bool", {"channel": "room:a", "event_type": "t", "data": "x", "raw": "yes"}, 400, "field raw"),
    (
        "raw data not a string",
        {"channel": "room:a", "event_type": "t", "data": 5, "raw": True},
        400,
        "data must be a str",
    ),
    ("LF in event type", {"channel": "room:a", "event_type": "t\ndata: evil", "data": 1}, 400, "CR, LF or NUL"),
    ("CR in event type", {"channel": "room:a", "event_type": "t\rid: 1", "data": 1}, 400, "CR, LF or NUL"),
    ("NUL in id", {"channel": "room:a", "event_type": "t", "data": 1, "id": "a\u0000b"}, 400, "CR, LF or NUL"),
    ("LF in id", {"channel": "room:a", "event_type": "t", "data": 1, "id": "1\n\ndata: x"}, 400, "CR, LF or NUL"),
    ("reserved type", {"channel": "room:a", "event_type": "stream.reset", "data": 1}, 400, "reserved"),
    ("SQL in channel", {"channel": "room'; DROP TABLE x;--", "event_type": "t", "data": 1}, 400, "channel may only"),
    ("200-byte channel", {"channel": "c" * 200, "event_type": "t", "data": 1}, 400, "the limit is 128"),
    ("empty channel", {"channel": "", "event_type": "t", "data": 1}, 400, "must not be empty"),
    ("lone surrogate channel", b'{"channel": "\\ud800", "event_type": "t", "data": 1}', 400, "channel may only"),
    ("NaN data", b'{"channel": "room:a", "event_type": "t", "data": NaN}', 400, "not JSON-serializable"),
    ("huge number", b'{"channel": "room:a", "event_type": "t", "data": 1e999}', 400, "not JSON-serializable"),
    (
        "deep nesting",
        b'{"channel": "room:a", "event_type": "t", "data": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        413,
        "",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "reason"), [case[1:] for case in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
def test_bad_bodies_get_their_4xx_and_publish_nothing(body, status, reason):
    """Each malformed request gets its documented 4xx with a JSON reason; nothing is published."""
    response = post(body)
    assert response.status_code == status
    assert reason in response.json()["error"]
    assert get_broker().last_position() == 0


def test_wrong_content_type_is_415():
    """Only application/json bodies are read."""
    assert post("channel=room:a", content_type="application/x-www-form-urlencoded").status_code == 415


def test_body_over_the_limit_is_413(settings):
    """Above MYAPP_PUBLISH_MAX_BODY_BYTES: 413, whatever the body says."""
    settings.MYAPP_PUBLISH_MAX_BODY_BYTES = 1000
    response = post({"channel": "room:a", "event_type": "t", "data": "x" * 2000})
    assert response.status_code == 413 and "1000 bytes" in response.json()["error"]


class CountingInput(io.BytesIO):
    """A de-chunked ``wsgi.input`` that counts the bytes the view asked for."""

    def __init__(self, body):
        super().__init__(body)
        self.asked = 0

    def read(self, size=-1, /):
        self.asked += size if size is not None and size >= 0 else len(self.getbuffer())
        return super().read(size)


def post_chunked(body, terminated=True):
    """POST ``body`` as a server hands over a chunked request: no CONTENT_LENGTH, the body in ``wsgi.input``."""
    extra = {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": CountingInput(body)}
    if terminated:
        extra["wsgi.input_terminated"] = True  # gunicorn, mod_wsgi: wsgi.input ends where the body ends
    request = RequestFactory().post(URL, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", **extra)
    del request.META["CONTENT_LENGTH"]
    return publish(request), extra["wsgi.input"]


def test_chunked_body_is_read_from_the_terminated_input():
    """A chunked body (no Content-Length) is read from wsgi.input when the server ends it there."""
    response, _ = post_chunked(json.dumps({"channel": "room:a", "event_type": "t", "data": 1}).encode())
    assert response.status_code == 200, response.content
    assert stored("room:a") == [("t", "1")]


def test_chunked_body_over_the_limit_is_413_after_limit_plus_one_bytes(settings):
    """A chunked body over MYAPP_PUBLISH_MAX_BODY_BYTES: 413, having asked for at most the limit plus one byte."""
    settings.MYAPP_PUBLISH_MAX_BODY_BYTES = 1000
    response, body = post_chunked(b"x" * 100_000)
    assert response.status_code == 413 and "1000 bytes" in json.loads(response.content)["error"]
    assert body.asked <= 1001


def test_chunked_body_the_server_cannot_end_is_411():
    """Chunked, but the server does not end wsgi.input at the body's end (no wsgi.input_terminated): 411."""
    response, body = post_chunked(b'{"channel": "room:a", "event_type": "t", "data": 1}', terminated=False)
    assert response.status_code == 411
    assert "Content-Length" in json.loads(response.content)["error"]
    assert body.asked == 0 and stored("room:a") == []


def test_event_over_the_size_limit_is_413(settings):
    """Data over MYAPP_MAX_EVENT_BYTES once encoded: 413 naming the limit."""
    settings.MYAPP_MAX_EVENT_BYTES = 100
    response = post({"channel": "room:a", "event_type": "t", "data": "é" * 60})
    assert response.status_code == 413 and "MYAPP_MAX_EVENT_BYTES" in response.json()["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "channel": st.text(max_size=30) | st.sampled_from(["room:a", "user:1", "room:b"]) | json_values,
        "event_type": st.text(max_size=20) | st.sampled_from(["t", "job.finished", "stream.close"]) | json_values,
        "data": json_values,
        "id": st.none() | st.text(max_size=20) | json_values,
        "raw": st.booleans() | json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=fields | st.binary(max_size=200).map(lambda raw: raw))
def test_fuzzed_bodies_never_500_and_published_events_are_intact(body):
    """Any body: a 2xx/4xx answer (never 500); every 200 stored exactly the data sent."""
    before = get_broker().last_position()
    response = post(body)
    assert response.status_code in (200, 400, 413), response.content
    if response.status_code == 200 and parse(response.json()["id"]) > before:  # not a deduplicated repeat
        (event,) = get_broker().history([body["channel"]], before).events
        expected = (
            body["data"] if body.get("raw") else json.dumps(body["data"], ensure_ascii=False, separators=(",", ":"))
        )
        assert (event.event_type, event.data) == (body["event_type"], expected)
    else:
        assert get_broker().last_position() == before


# -- POST /api/events/batch/ ------------------------------------------------------

BATCH_URL = "/api/events/batch/"


def post_batch(body, token=TOKEN, content_type="application/json"):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return Client().post(BATCH_URL, data=body, content_type=content_type, CONTENT_TYPE=content_type, **headers)


def note(channel, n, **fields):
    return {"channel": channel, "event_type": "note", "data": {"n": n}, **fields}


def test_batch_publishes_every_event_in_order():
    """A valid batch: 200 with one id per event, in order; every event stored in that order."""
    events = [note("room:a", 0), note("room:b", 1), note("room:a", 2, id="pub-2"), note("room:a", 3)]
    response = post_batch({"events": events})
    assert response.status_code == 200, response.content
    ids = [parse(event_id) for event_id in response.json()["ids"]]
    assert len(ids) == 4 and ids == sorted(ids) and ids[-1] == get_broker().last_position()
    assert stored("room:a") == [("note", '{"n":0}'), ("note", '{"n":2}'), ("note", '{"n":3}')]
    assert stored("room:b") == [("note", '{"n":1}')]


def test_batch_with_invalid_events_publishes_nothing_and_says_which(settings):
    """Mixed valid and invalid events: 400 listing each invalid one (index, status, reason); nothing published."""
    settings.MYAPP_MAX_EVENT_BYTES = 100
    events = [
        note("room:a", 0),
        note("bad channel", 1),
        {"channel": "room:a", "event_type": "t\ndata: x", "data": 1},
        note("room:a", 3),
        "not an object",
        {"channel": "room:a", "event_type": "t", "data": "x" * 200},
        {"channel": "room:a", "event_type": "t"},
    ]
    response = post_batch({"events": events})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "5 of 7 events are invalid; nothing was published"
    assert [(e["index"], e["status"]) for e in body["errors"]] == [(1, 400), (2, 400), (4, 400), (5, 413), (6, 400)]
    reasons = [e["error"] for e in body["errors"]]
    assert "channel may only" in reasons[0] and "CR, LF or NUL" in reasons[1]
    assert "must be a JSON object" in reasons[2] and "MYAPP_MAX_EVENT_BYTES" in reasons[3]
    assert reasons[4] == "missing field: data"
    assert get_broker().last_position() == 0


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({}, 400, "at least one event"),
        ({"events": []}, 400, "at least one event"),
        ({"events": {"channel": "room:a"}}, 400, "at least one event"),
        ([note("room:a", 0)], 400, "must be a JSON object"),
        ({"events": [note("room:a", 0)], "atomic": True}, 400, "unknown fields: atomic"),
        ({"events": [note("room:a", n) for n in range(101)]}, 413, "MYAPP_PUBLISH_MAX_BATCH_EVENTS"),
        (b"{nope", 400, "not valid JSON"),
        (b"", 400, "the body is empty"),
    ],
    ids=["no events", "empty list", "not a list", "a bare list", "unknown field", "too many", "not JSON", "empty"],
)
def test_bad_batch_bodies_get_their_4xx(body, status, reason):
    """A batch body of the wrong shape: its 4xx with a reason; nothing published."""
    response = post_batch(body)
    assert response.status_code == status
    assert reason in response.json()["error"]
    assert get_broker().last_position() == 0


def test_batch_has_the_same_body_limit_and_auth(settings):
    """The batch endpoint shares the single one's body limit, tokens and content type."""
    settings.MYAPP_PUBLISH_MAX_BODY_BYTES = 1000
    events = {"events": [note("room:a", n) for n in range(50)]}
    assert post_batch(events).status_code == 413
    assert post_batch({"events": [note("room:a", 0)]}, token=None).status_code == 401
    assert post_batch({"events": [note("room:a", 0)]}, token="wrong-token").status_code == 403
    assert post_batch("x", content_type="text/plain").status_code == 415
    assert Client().get(BATCH_URL, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405
    assert get_broker().last_position() == 0


def test_batch_repeats_of_one_publisher_id_deliver_once():
    """Within a batch, as across requests, a repeated publisher id returns the first event's id."""
    response = post_batch({"events": [note("room:a", 0, id="same"), note("room:a", 1, id="same")]})
    first, again = response.json()["ids"]
    assert first == again and stored("room:a") == [("note", '{"n":0}')]


def test_broker_failing_midway_answers_503_with_what_was_published(monkeypatch):
    """The broker fails at the third event: 503 + Retry-After, the ids of the first two, which alone were published."""
    from myapp.exceptions import BrokerUnavailable

    broker = get_broker()
    real = broker.publish
    calls = []

    def publish(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise BrokerUnavailable("down now")
        return real(*args, **kwargs)

    monkeypatch.setattr(broker, "publish", publish)
    response = post_batch({"events": [note("room:a", n) for n in range(5)]})
    assert response.status_code == 503 and response["Retry-After"] == "5"
    body = response.json()
    assert len(body["ids"]) == 2 and "the first 2 of 5 events were published" in body["error"]
    assert stored("room:a") == [("note", '{"n":0}'), ("note", '{"n":1}')]
    assert [parse(event_id) for event_id in body["ids"]] == [e.pos for e in broker.history(["room:a"], 0).events]


def test_event_the_broker_refuses_midway_answers_400_with_what_was_published(monkeypatch):
    """A valid event the broker refuses (InvalidEvent from the backend): 400 naming it, the ids before it."""
    broker = get_broker()
    real = broker.publish

    def publish(channel, event_type, data, **kwargs):
        if data == '{"n":1}':
            raise InvalidEvent("this broker cannot store it")
        return real(channel, event_type, data, **kwargs)

    monkeypatch.setattr(broker, "publish", publish)
    response = post_batch({"events": [note("room:a", n) for n in range(3)]})
    assert response.status_code == 400
    body = response.json()
    assert len(body["ids"]) == 1 and body["errors"] == [
        {"index": 1, "status": 400, "error": "this broker cannot store it"}
    ]
    assert stored("room:a") == [("note", '{"n":0}')]


@pytest.mark.django_db
def test_durable_batch_is_queued_in_one_transaction(settings):
    """With MYAPP_DURABLE_PUBLISH, a batch goes to the outbox whole: 202 with the count, nothing published yet."""
    from myapp.outbox.models import OutboxEvent

    settings.MYAPP_DURABLE_PUBLISH = True
    response = post_batch({"events": [note("room:a", n) for n in range(3)]})
    assert (response.status_code, response.json()) == (202, {"queued": 3})
    assert [bytes(row.data) for row in OutboxEvent.objects.order_by("id")] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert get_broker().last_position() == 0, "the relay publishes them, not the request"
    assert post_batch({"events": [note("room:b", 0), note("bad channel", 1)]}).status_code == 400
    assert OutboxEvent.objects.count() == 3, "an invalid batch queues nothing"


@pytest.mark.django_db
def test_durable_batch_is_all_or_nothing_when_the_database_fails(settings, monkeypatch):
    """The database failing at the third row: 503, and the first two rows are rolled back with it."""
    from django.db import OperationalError

    from myapp.outbox import store
    from myapp.outbox.models import OutboxEvent

    settings.MYAPP_DURABLE_PUBLISH = True
    real = store.enqueue
    calls = []

    def enqueue(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise OperationalError("the server closed the connection")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "enqueue", enqueue)
    response = post_batch({"events": [note("room:a", n) for n in range(5)]})
    assert response.status_code == 503 and response["Retry-After"] == "5"
    assert len(calls) == 3 and not OutboxEvent.objects.exists()


@pytest.mark.django_db
def test_durable_single_publish_answers_202(settings):
    """With MYAPP_DURABLE_PUBLISH, the single endpoint answers 202 {"queued": 1}."""
    settings.MYAPP_DURABLE_PUBLISH = True
    response = post({"channel": "room:a", "event_type": "t", "data": 1})
    assert (response.status_code, response.json()) == (202, {"queued": 1})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(fields, min_size=1, max_size=5))
def test_fuzzed_batches_publish_all_or_nothing(events):
    """Any batch of fuzzed events: 200 with every event stored in order, or a 4xx with nothing stored."""
    before = get_broker().last_position()
    response = post_batch({"events": events})
    assert response.status_code in (200, 400, 413), response.content
    if response.status_code != 200:
        assert get_broker().last_position() == before
        return
    assert len(response.json()["ids"]) == len(events)
    for event, event_id in zip(events, response.json()["ids"], strict=True):
        if parse(event_id) <= before:  # a repeat of an id published by an earlier example
            continue
        (stored_event,) = [
            e for e in get_broker().history([event["channel"]], before).events if e.pos == parse(event_id)
        ]
        assert stored_event.event_type == event["event_type"]


# -- batches on the real stack ----------------------------------------------------------


@pytest.mark.e2e
def test_batch_on_the_real_stack_delivers_in_order_or_not_at_all(stack):
    """gunicorn: a valid batch reaches the stream in order; a batch with one invalid event delivers none of it."""
    import requests

    from tests.sse_client import SSEClient
    from tests.stack import PUBLISH_TOKEN

    def batch(events):
        return requests.post(
            stack.url + "/api/events/batch/",
            json={"events": events},
            headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
            timeout=10,
        )

    session = stack.login("alice")
    client = SSEClient(session, stack.url + "/events/?channel=room:batch-a&channel=room:batch-b")
    try:
        client.wait_count("stream.open", 1)
        refused = batch([note("room:batch-a", "x1"), note("room:batch-a", "x2", id="a\nb"), note("room:batch-b", "x3")])
        assert refused.status_code == 400
        assert [(e["index"], e["status"]) for e in refused.json()["errors"]] == [(1, 400)]
        accepted = batch([note(f"room:batch-{'ab'[n % 2]}", n) for n in range(20)])
        assert accepted.status_code == 200, accepted.text
        client.wait_count("note", 20)
        received = [(m.last_event_id, json.loads(m.data)["n"]) for m in client.messages if m.type == "note"]
        assert [n for _, n in received] == list(range(20)), "in order, and nothing of the refused batch"
        assert [event_id for event_id, _ in received] == accepted.json()["ids"]
    finally:
        client.close()
