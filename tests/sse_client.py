"""An SSE parser written from the spec, independent of ``myapp.sse``, and a test client.

Parser: WHATWG HTML Living Standard 9.2.6 "Interpreting an event stream",
followed step by step (UTF-8 decode, BOM, CRLF/LF/CR lines, fields, dispatch).
"""

import codecs
import queue
import threading
import time
from dataclasses import dataclass

import requests


@dataclass
class Message:
    """A dispatched event: what a browser hands to its listener."""

    type: str
    data: str
    last_event_id: str


class SSEParser:
    """Feed bytes, get dispatched messages. ``last_event_id`` and ``retry`` follow the spec."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._first = True
        self._pending_cr = False
        self.data = ""
        self.event_type = ""
        self.id_buffer = ""
        self.last_event_id = ""
        self.retry = None
        self.comments = []

    def feed(self, chunk):
        text = self._decoder.decode(chunk)
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        messages = []
        self._text += text
        while True:
            text = self._text
            if self._pending_cr:
                # A CR ended the previous line; an LF right after it belongs to it.
                if not text:
                    break
                self._pending_cr = False
                if text[0] == "\n":
                    text = self._text = text[1:]
            positions = [p for p in (text.find("\r"), text.find("\n")) if p != -1]
            if not positions:
                break
            end = min(positions)
            line = text[:end]
            if text[end] == "\r":
                if end + 1 < len(text):
                    rest = text[end + 2 :] if text[end + 1] == "\n" else text[end + 1 :]
                else:
                    rest = ""
                    self._pending_cr = True
            else:
                rest = text[end + 1 :]
            self._text = rest
            message = self._line(line)
            if message is not None:
                messages.append(message)
        return messages

    def _line(self, line):
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            self.event_type = value
        elif field == "data":
            self.data += value + "\n"
        elif field == "id" and "\0" not in value:
            self.id_buffer = value
        elif field == "retry" and value and all("0" <= c <= "9" for c in value):
            self.retry = int(value)
        return None

    def _dispatch(self):
        self.last_event_id = self.id_buffer
        if self.data == "":
            self.data = ""
            self.event_type = ""
            return None
        data = self.data[:-1] if self.data.endswith("\n") else self.data
        message = Message(self.event_type or "message", data, self.last_event_id)
        self.data = ""
        self.event_type = ""
        return message


class ChunkedDecoder:
    """A strict decoder of HTTP/1.1 chunked transfer coding (RFC 9112 7.1): raises on any framing error.

    ``ended`` turns True at the last chunk (size 0, no trailer): the response ended cleanly.
    """

    def __init__(self):
        self.buffer = b""
        self.ended = False

    def feed(self, data):
        self.buffer += data
        out = []
        while not self.ended:
            head, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            size = int(head, 16)  # ValueError on garbage
            if len(rest) < size + 2:
                break
            if rest[size : size + 2] != b"\r\n":
                raise ValueError(f"chunk of {size} bytes not followed by CRLF: {rest[: size + 2]!r}")
            out.append(rest[:size])
            self.buffer = rest[size + 2 :]
            if size == 0:
                self.ended = True
        return b"".join(out)


def parse_all(raw):
    """Parse a whole stream (bytes) and return its messages."""
    return SSEParser().feed(raw)


class SSEClient:
    """A streaming client over ``requests``: messages arrive on a background thread.

    session: a requests.Session (cookies for the login).
    url: the stream URL. last_event_id: sent as the Last-Event-ID header.
    """

    def __init__(self, session, url, *, last_event_id=None, headers=None, timeout=30):
        self.parser = SSEParser()
        self.messages = []
        self._queue = queue.Queue()
        self.ended = threading.Event()
        self.error = None
        headers = dict(headers or {})
        headers.setdefault("Accept", "text/event-stream")
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.response = session.get(url, stream=True, headers=headers, timeout=(5, timeout))
        self.status = self.response.status_code
        self.headers = self.response.headers
        self.local_port = self._local_port()
        if self.status == 200:
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        else:
            self.ended.set()

    def _local_port(self):
        """The client side's TCP port (to find the server process holding the stream)."""
        try:
            return self.response.raw._fp.fp.raw._sock.getsockname()[1]  # http.client's socket
        except AttributeError:
            return None

    def _read(self):
        try:
            for chunk in self.response.iter_content(chunk_size=None):
                for message in self.parser.feed(chunk):
                    self.messages.append(message)
                    self._queue.put(message)
        except Exception as error:  # noqa: BLE001 - reported through .error
            self.error = error
        finally:
            self.ended.set()

    @property
    def last_event_id(self):
        return self.parser.last_event_id

    def of_type(self, event_type):
        return [message for message in self.messages if message.type == event_type]

    def wait_for(self, predicate, timeout=10.0, what="messages"):
        """Wait until ``predicate(self.messages)`` is true; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.messages):
                return self.messages
            if self.ended.is_set() and self._queue.empty():
                break  # the stream ended and everything it sent was seen
            try:
                self._queue.get(timeout=min(0.1, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                pass
        raise AssertionError(f"timed out waiting for {what}; got {[(m.type, m.data[:60]) for m in self.messages]}")

    def wait_count(self, event_type, count, timeout=10.0):
        self.wait_for(
            lambda ms: len([m for m in ms if m.type == event_type]) >= count, timeout, f"{count} {event_type}"
        )
        return self.of_type(event_type)

    def wait_end(self, timeout=10.0):
        if not self.ended.wait(timeout):
            raise AssertionError("the stream did not end")

    def close(self):
        self.response.close()


def login(base_url, username, password):
    """Return a requests.Session logged in through the login form."""
    session = requests.Session()
    session.get(base_url + "/accounts/login/", timeout=10)
    response = session.post(
        base_url + "/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        timeout=10,
        allow_redirects=False,
    )
    assert response.status_code == 302, f"login failed for {username}: {response.status_code}"
    return session
