"""POST /api/events/: authentication, validation, limits, and never a 500 (in-process, memory broker)."""

import io
import json
import logging

import pytest
from django.test import Client, RequestFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myapp.brokers import get_broker
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
