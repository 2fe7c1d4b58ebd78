"""The control API: end a user's open streams on every worker and host, from any language.

``POST /api/control/`` with the publish API's authentication, limits and
body rules (``myapp.views.body``: a bearer token of MYAPP_PUBLISH_TOKENS,
``Content-Type: application/json``, at most MYAPP_PUBLISH_MAX_BODY_BYTES)::

    {"action": "disconnect", "user": 42}
    {"action": "unsubscribe", "user": "42", "channel": "room:staff"}

``user`` is the user's primary key (a JSON string or integer; the user need
not exist any more: ending a deleted user's streams is the point). The
actions are those of ``myapp.control``: ``disconnect`` ends every stream of
the user (``stream.end`` with ``reconnect: false``, push.js stops);
``unsubscribe`` ends the user's streams that carry ``channel`` (``reconnect:
true``, they reconnect and are authorized again).

Answers: 200 ``{"id": "<control message id>"}`` once the broker took the
message (every hub then ends the matching streams; one that is away applies it
when it catches up); 400 with ``{"error": reason}`` for an unknown action,
missing, unknown or wrongly typed fields, or an invalid channel name; the
body's 401/403/405/411/413/415; 503 + Retry-After when the broker is down
(then no stream was ended). Never a 500.
"""

import logging

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from myapp import control as actions
from myapp.exceptions import BrokerUnavailable, InvalidEvent

from .body import json_request
from .responses import error, unavailable

__all__ = ["control"]

log = logging.getLogger("myapp.views")

#: action -> the fields it takes (all required)
_ACTIONS = {"disconnect": ("action", "user"), "unsubscribe": ("action", "user", "channel")}


def _problem(payload):
    """Return why ``payload`` is not a control request, or None."""
    if not isinstance(payload, dict):
        return "the body must be a JSON object"
    action = payload.get("action")
    if action not in _ACTIONS:
        return 'field action must be "disconnect" or "unsubscribe"'
    fields = _ACTIONS[action]
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        return f"unknown fields for {action}: {', '.join(unknown)[:200]}"
    missing = [name for name in fields if name not in payload]
    if missing:
        return f"missing field: {missing[0]}"
    user = payload["user"]
    if isinstance(user, bool) or not isinstance(user, (str, int)) or user == "":
        return "field user must be the user's primary key (a non-empty string or an integer)"
    if action == "unsubscribe" and not isinstance(payload["channel"], str):
        return "field channel has the wrong type"
    return None


@csrf_exempt  # authenticated by a bearer token, not a cookie: CSRF cannot apply
def control(request):
    """End a user's open streams (``disconnect`` or ``unsubscribe``) from a JSON body."""
    payload, failed = json_request(request)
    if failed is not None:
        return failed
    reason = _problem(payload)
    if reason is not None:
        return error(400, reason)
    try:
        if payload["action"] == "disconnect":
            message_id = actions.disconnect(payload["user"])
        else:
            message_id = actions.unsubscribe(payload["user"], payload["channel"])
    except (InvalidEvent, ValueError) as failure:
        return error(400, str(failure))
    except BrokerUnavailable as failure:
        log.warning("control API: broker unavailable: %s", failure)
        return unavailable("the event broker is unavailable; retry later (no stream was ended)")
    return JsonResponse({"id": message_id})
