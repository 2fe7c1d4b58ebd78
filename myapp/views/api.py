"""The publish API for publishers that are not Python: one event, or a batch.

``POST /api/events/`` publishes one event. Request: ``Authorization: Bearer
<token>`` (one of MYAPP_PUBLISH_TOKENS), ``Content-Type: application/json``,
a body of at most MYAPP_PUBLISH_MAX_BODY_BYTES bytes::

    {"channel": "room:lobby", "event_type": "chat.message",
     "data": {"text": "hi"}, "id": "optional-publisher-id", "raw": false}

``POST /api/events/batch/`` publishes a list of such events, in order, with
the same authentication, body limit and rules::

    {"events": [{"channel": "room:lobby", "event_type": "chat.message", "data": 1}, ...]}

The body comes with ``Content-Length`` or ``Transfer-Encoding: chunked``.
Either way at most MYAPP_PUBLISH_MAX_BODY_BYTES + 1 bytes are read: a larger
Content-Length is refused unread, a longer chunked body as soon as that many
bytes have arrived. A chunked body is read from ``wsgi.input`` (Django reads
nothing without a Content-Length), which only servers that set
``wsgi.input_terminated`` (gunicorn, mod_wsgi) de-chunk and end at the body's
end; elsewhere (Django's runserver) a chunked body gets 411. A request with
neither header has an empty body (RFC 9112 6.3).

Answers of both: 400 with ``{"error": reason}`` for an empty body, a body
that cannot be read (malformed chunks, a disconnect), malformed JSON, invalid
UTF-8, wrong types, unknown fields or invalid names; 401 without a bearer
token; 403 for a wrong one (or when no token is configured); 405 for other
methods; 411 for a chunked body the server cannot end; 413 for an over-size
body or event; 415 for another content type; 503 + Retry-After when the
broker (or, publishing durably, the database) is down. Never a 500.

One event: 200 ``{"id": "<event id>"}``; with MYAPP_DURABLE_PUBLISH, 202
``{"queued": 1}`` once the event is committed to the outbox.

A batch is validated whole before anything is published: if any event is
invalid the answer is 400 ``{"error": "2 of 5 events are invalid; nothing
was published", "errors": [{"index": 1, "status": 400, "error": reason},
...]}`` (``index`` counts from 0; ``status`` is what publishing that event
alone would answer, 400 or 413) and nothing is published. More than
MYAPP_PUBLISH_MAX_BATCH_EVENTS events, or none, is refused the same way
(413 / 400). Then:

- published directly (the default): 200 ``{"ids": [...]}``, one event id per
  event, in order. The events are published one after the other; if the
  broker fails midway the answer is 503 + Retry-After with ``{"error": ...,
  "ids": [...]}``: exactly the first ``len(ids)`` events were published (in
  order), the rest were not. Retry the rest; give each event an ``id`` and
  retrying the whole batch is safe too (repeats deliver nothing). The same
  holds for an event the broker itself refuses although it passed validation
  (the PostgreSQL broker and a value it cannot store, rare): 400 with its
  ``errors`` entry and the ``ids`` published before it.
- with MYAPP_DURABLE_PUBLISH (the app ``myapp.outbox``): all events go to the
  outbox in one transaction, so the batch is all or nothing: 202
  ``{"queued": n}`` once committed (the relay publishes them in order), or
  503 with nothing queued when the database cannot take them.
"""

import logging

from django.db import InterfaceError, OperationalError, transaction
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from myapp.conf import setting
from myapp.exceptions import BrokerUnavailable, EventTooLarge, InvalidEvent
from myapp.publish import encode_data, send_event, validate_event

from .body import json_request
from .responses import error, unavailable

__all__ = ["publish", "publish_batch"]

log = logging.getLogger("myapp.views")

_FIELDS = {"channel": str, "event_type": str, "data": object, "id": (str, type(None)), "raw": bool}
_REQUIRED = ("channel", "event_type", "data")


def _shape_error(payload, what="the body"):
    """Return why ``payload`` is not an event object (fields and their JSON types), or None."""
    if not isinstance(payload, dict):
        return f"{what} must be a JSON object"
    unknown = sorted(set(payload) - set(_FIELDS))
    if unknown:
        return f"unknown fields: {', '.join(unknown)[:200]}"
    for name in _REQUIRED:
        if name not in payload:
            return f"missing field: {name}"
    for name, kind in _FIELDS.items():
        if name in payload and not isinstance(payload[name], kind):
            return f"field {name} has the wrong type"
    return None


def _event_error(payload):
    """Return ``(status, reason)`` if the event object ``payload`` cannot be published, else None.

    The same rules as ``send_event``: 413 for data over MYAPP_MAX_EVENT_BYTES,
    400 for everything else.
    """
    reason = _shape_error(payload, "an event")
    if reason is not None:
        return 400, reason
    try:
        text = encode_data(payload["data"], raw=payload.get("raw", False))
        validate_event(payload["channel"], payload["event_type"], text, payload.get("id"))
    except EventTooLarge as failure:
        return 413, str(failure)
    except InvalidEvent as failure:
        return 400, str(failure)
    return None


def _send(payload):
    return send_event(
        payload["channel"],
        payload["event_type"],
        payload["data"],
        id=payload.get("id"),
        raw=payload.get("raw", False),
    )


def _database_unavailable(failure):
    log.warning("publish API: database unavailable for the outbox: %s", failure)
    return unavailable("the database is unavailable; retry later")


@csrf_exempt  # authenticated by a bearer token, not a cookie: CSRF cannot apply
def publish(request):
    """Publish one event from a JSON body."""
    payload, failed = json_request(request)
    if failed is not None:
        return failed
    reason = _shape_error(payload)
    if reason is not None:
        return error(400, reason)
    durable = setting("MYAPP_DURABLE_PUBLISH")
    try:
        event_id = _send(payload)
    except EventTooLarge as failure:
        return error(413, str(failure))
    except InvalidEvent as failure:
        return error(400, str(failure))
    except BrokerUnavailable as failure:
        log.warning("publish API: broker unavailable: %s", failure)
        return unavailable("the event broker is unavailable; retry later")
    except (OperationalError, InterfaceError) as failure:
        if not durable:
            raise
        return _database_unavailable(failure)
    if durable:
        return JsonResponse({"queued": 1}, status=202)
    return JsonResponse({"id": event_id})


@csrf_exempt  # authenticated by a bearer token, not a cookie: CSRF cannot apply
def publish_batch(request):
    """Publish a list of events from a JSON body ``{"events": [...]}``: all validated first, then in order."""
    payload, failed = json_request(request)
    if failed is not None:
        return failed
    if not isinstance(payload, dict):
        return error(400, "the body must be a JSON object")
    unknown = sorted(set(payload) - {"events"})
    if unknown:
        return error(400, f"unknown fields: {', '.join(unknown)[:200]}")
    events = payload.get("events")
    if not isinstance(events, list) or not events:
        return error(400, 'the body must be {"events": [...]} with at least one event')
    limit = setting("MYAPP_PUBLISH_MAX_BATCH_EVENTS")
    if len(events) > limit:
        return error(413, f"{len(events)} events; at most {limit} per batch (MYAPP_PUBLISH_MAX_BATCH_EVENTS)")
    errors = []
    for index, event in enumerate(events):
        problem = _event_error(event)
        if problem is not None:
            errors.append({"index": index, "status": problem[0], "error": problem[1]})
    if errors:
        return JsonResponse(
            {"error": f"{len(errors)} of {len(events)} events are invalid; nothing was published", "errors": errors},
            status=400,
        )
    if setting("MYAPP_DURABLE_PUBLISH"):
        try:
            with transaction.atomic():  # the outbox: all or nothing
                for event in events:
                    _send(event)
        except (OperationalError, InterfaceError) as failure:
            return _database_unavailable(failure)
        return JsonResponse({"queued": len(events)}, status=202)
    ids = []
    for event in events:
        try:
            ids.append(_send(event))
        except BrokerUnavailable as failure:
            log.warning("publish API: broker unavailable after %d of %d events: %s", len(ids), len(events), failure)
            response = JsonResponse(
                {
                    "error": f"the event broker is unavailable; the first {len(ids)} of {len(events)} events "
                    "were published, retry the rest later",
                    "ids": ids,
                },
                status=503,
            )
            response["Retry-After"] = str(setting("MYAPP_RETRY_AFTER_SECONDS"))
            return response
        except InvalidEvent as failure:  # valid here, but this broker cannot store it (rare)
            index = len(ids)
            return JsonResponse(
                {
                    "error": f"the broker refused event {index}; the first {index} of {len(events)} events "
                    "were published",
                    "errors": [
                        {
                            "index": index,
                            "status": 413 if isinstance(failure, EventTooLarge) else 400,
                            "error": str(failure),
                        }
                    ],
                    "ids": ids,
                },
                status=400,
            )
    return JsonResponse({"ids": ids})
