"""The server-sent events wire format.

Source: WHATWG HTML Living Standard, section 9.2 "Server-sent events"
(https://html.spec.whatwg.org/multipage/server-sent-events.html), in particular
9.2.5 "Parsing an event stream" and 9.2.6 "Interpreting an event stream".

Pure functions from str to UTF-8 bytes; this module imports nothing from Django,
the brokers or the hub. Every frame it returns is complete: it ends with the
blank line that dispatches the block, so a stream cut between two frames never
leaves a half event for the client to drop or misread.
"""

import re

__all__ = ["encode", "comment", "FORBIDDEN_IN_FIELD"]

# 9.2.5: a line ends with CRLF, a lone LF or a lone CR. str.splitlines() would
# also split on \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029 and corrupt data.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

#: Characters that may not appear in an ``event`` or ``id`` value. CR and LF
#: would end the field early (field injection, CWE-93); a NUL makes browsers
#: ignore an ``id`` (9.2.6, "If the field value does not contain U+0000 NULL").
FORBIDDEN_IN_FIELD = ("\r", "\n", "\0")


def _check_field(name, value):
    for char in FORBIDDEN_IN_FIELD:
        if char in value:
            raise ValueError(f"SSE {name} must not contain {char!r}: {value!r}")


def encode(data=None, *, event=None, id=None, retry=None, comment=None):
    """Return one complete SSE frame as UTF-8 bytes.

    data: the event's data (str). Split on CRLF, CR and LF into one
        ``data:`` line each, so the client's ``MessageEvent.data`` equals
        ``data`` with every line break normalised to LF (9.2.6). An empty
        string still writes one empty ``data:`` line, so the event is
        dispatched. None writes no data line: the block then dispatches no
        event, but its ``id`` (if any) still sets the client's last event ID.
    event: the event type (str), or None for the default type "message".
    id: the event id (str); an empty string resets the client's last event ID.
    retry: the reconnection delay in milliseconds (int >= 0).
    comment: a comment (str), written as ``:`` lines that no listener sees
        (used for heartbeats and to flush headers).

    Every field value is written after ``": "`` (one space, which the parser
    removes), so values with a leading space survive byte for byte. The frame
    ends with a blank line.

    Raise ValueError if ``event`` or ``id`` contains CR, LF or NUL, or if
    ``retry`` is not a non-negative int.
    """
    lines = []
    if comment is not None:
        lines.extend(":" + line if line else ":" for line in _LINE_BREAK.split(comment))
    if retry is not None:
        if type(retry) is not int or retry < 0:
            raise ValueError(f"SSE retry must be a non-negative int of milliseconds: {retry!r}")
        lines.append(f"retry: {retry}")
    if event is not None:
        _check_field("event", event)
        lines.append("event: " + event)
    if id is not None:
        _check_field("id", id)
        lines.append("id: " + id)
    if data is not None:
        if "\n" in data or "\r" in data:
            lines.extend("data: " + line for line in _LINE_BREAK.split(data))
        else:
            lines.append("data: " + data)
    lines.append("\n")
    return "\n".join(lines).encode("utf-8")


def comment(text=""):
    """Return a comment-only frame (bytes): a heartbeat that no listener sees.

    text: the comment (str); line breaks in it start new comment lines.
    """
    return encode(comment=text)
