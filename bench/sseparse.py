"""Fast incremental decoders for the load generator: HTTP/1.1 chunked bodies and SSE streams.

Both take bytes as they come off a socket (any split) and return what is
complete. No Django, no HTTP library: the load generator runs thousands of
these per process, so the hot path is a few ``bytes`` methods per chunk.

- ``ChunkedDecoder``: RFC 9112 section 7.1 (chunk size in hex, optional
  extensions after ``;``, CRLF after each chunk's data, a zero-size chunk ends
  the body; trailers are ignored).
- ``SSEParser``: WHATWG HTML Living Standard 9.2.6 "Interpreting an event
  stream". Lines may end with CRLF, LF or CR; a leading UTF-8 BOM is dropped;
  a field splits at the first colon and loses one leading space; ``data``
  lines join with LF; an event with no data line is not dispatched; ``id``
  (without NUL) persists across events and becomes the last event ID at every
  dispatch; ``retry`` takes ASCII digits only. Our server only sends LF, so
  the common case splits on blank lines (``\\n\\n``) and never decodes text
  it does not hand out; CR and CRLF are normalised to LF first when present.
"""

__all__ = ["ChunkedDecoder", "SSEParser", "ProtocolError"]

_BOM = b"\xef\xbb\xbf"


class ProtocolError(ValueError):
    """The peer sent bytes that are not a valid chunked body."""


class ChunkedDecoder:
    """Decode a ``Transfer-Encoding: chunked`` body incrementally.

    ``feed(data)`` returns the body bytes decoded so far from ``data`` (bytes,
    possibly empty). ``done`` becomes True after the last (zero-size) chunk.
    Raise ProtocolError on a malformed chunk-size line.
    """

    __slots__ = ("_buffer", "_left", "_crlf", "done")

    def __init__(self):
        self._buffer = b""
        self._left = 0  # bytes of the current chunk's data still to come
        self._crlf = 0  # bytes of the CRLF after a chunk's data still to skip
        self.done = False

    def feed(self, data):
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        size = len(data)
        pos = 0
        out = []
        while pos < size and not self.done:
            if self._left:
                end = min(size, pos + self._left)
                out.append(data[pos:end])
                self._left -= end - pos
                pos = end
                if not self._left:
                    self._crlf = 2
            elif self._crlf:
                skip = min(self._crlf, size - pos)
                pos += skip
                self._crlf -= skip
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > 1024:
                        raise ProtocolError("chunk-size line longer than 1 KB")
                    self._buffer = data[pos:]
                    break
                line = data[pos:eol].split(b";", 1)[0].strip()
                try:
                    chunk = int(line, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk-size line {line[:40]!r}") from None
                pos = eol + 2
                if chunk == 0:
                    self.done = True
                else:
                    self._left = chunk
        if len(out) == 1:
            return out[0]
        return b"".join(out)


class SSEParser:
    """Turn event-stream bytes into dispatched events (WHATWG HTML 9.2.6).

    ``feed(data)`` takes bytes and returns a list of ``(type, data,
    last_event_id)`` tuples of str, one per dispatched event, in order.
    ``last_event_id`` and ``retry`` (milliseconds, int or None) follow the
    spec; ``comments`` counts heartbeats: comment lines, and blocks without
    data (the service's ``stream.position`` heartbeats dispatch nothing).
    """

    __slots__ = ("_buffer", "_started", "_pending_cr", "_data", "_type", "_id", "last_event_id", "retry", "comments")

    def __init__(self):
        self._buffer = b""
        self._started = False
        self._pending_cr = False
        self._data = []
        self._type = b""
        self._id = b""
        self.last_event_id = ""
        self.retry = None
        self.comments = 0

    def feed(self, data):
        if not self._started:
            data = self._buffer + data
            self._buffer = b""
            if len(data) < 3 and _BOM.startswith(data):
                self._buffer = data  # maybe the start of a BOM: wait for more
                return []
            self._started = True
            if data.startswith(_BOM):
                data = data[3:]
        if self._pending_cr:
            self._pending_cr = False
            if data[:1] == b"\n":
                data = data[1:]  # the LF of a CRLF split across two reads
        if b"\r" in data:
            self._pending_cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + data if self._buffer else data
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._buffer = buffer
            return []
        self._buffer = buffer[end + 2 :]
        events = []
        for line in buffer[: end + 1].split(b"\n"):
            if not line:
                self._dispatch(events)
            elif line[0] == 58:  # ":" a comment
                self.comments += 1
            else:
                colon = line.find(b":")
                if colon < 0:
                    field, value = line, b""
                else:
                    field, value = line[:colon], line[colon + 1 :]
                    if value[:1] == b" ":
                        value = value[1:]
                if field == b"data":
                    self._data.append(value)
                elif field == b"event":
                    self._type = value
                elif field == b"id":
                    if b"\0" not in value:
                        self._id = value
                elif field == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits only
                    self.retry = int(value)
        return events

    def _dispatch(self, events):
        self.last_event_id = self._id.decode("utf-8", "replace") if self._id else ""
        if self._data:
            data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            event_type = self._type.decode("utf-8", "replace") if self._type else "message"
            events.append((event_type, data.decode("utf-8", "replace"), self.last_event_id))
            self._data = []
        elif self._type == b"stream.position":
            self.comments += 1
        self._type = b""
