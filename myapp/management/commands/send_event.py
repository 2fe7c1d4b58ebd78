"""``manage.py send_event CHANNEL EVENT_TYPE DATA_JSON``: publish one event."""

import json

from django.core.management.base import BaseCommand, CommandError

from myapp.exceptions import BrokerUnavailable, InvalidEvent
from myapp.publish import send_event


class Command(BaseCommand):
    help = "Publish one event to a channel. DATA_JSON is any JSON value (use --raw to send text as is)."

    def add_arguments(self, parser):
        parser.add_argument("channel", help="channel name, e.g. user:1 or room:lobby")
        parser.add_argument("event_type", help="SSE event type, e.g. job.finished")
        parser.add_argument("data", help="the data as JSON, e.g. '{\"ok\": true}'")
        parser.add_argument(
            "--id", dest="key", default=None, help="publisher-chosen id: a repeat is not delivered twice"
        )
        parser.add_argument("--raw", action="store_true", help="send DATA as plain text instead of parsing it as JSON")

    def handle(self, channel, event_type, data, key, raw, **options):
        if not raw:
            try:
                data = json.loads(data)
            except ValueError as error:
                raise CommandError(f"DATA_JSON is not valid JSON ({error}); pass --raw to send it as text") from None
        try:
            event_id = send_event(channel, event_type, data, id=key, raw=raw)
        except InvalidEvent as error:
            raise CommandError(str(error)) from None
        except BrokerUnavailable as error:
            raise CommandError(f"the broker is unavailable: {error}") from None
        self.stdout.write(event_id)
