"""``manage.py send_event CHANNEL EVENT_TYPE DATA_JSON``: publish one event.

Prints the event id, or ``queued`` when the event went to the outbox
(``--durable``, or MYAPP_DURABLE_PUBLISH; the relay publishes it).
"""

import json

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import InterfaceError, OperationalError

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
        parser.add_argument(
            "--durable",
            action="store_true",
            default=None,
            help="write the event to the outbox (myapp.outbox) for the relay to publish; default MYAPP_DURABLE_PUBLISH",
        )

    def handle(self, channel, event_type, data, key, raw, durable, **options):
        if not raw:
            try:
                data = json.loads(data)
            except ValueError as error:
                raise CommandError(f"DATA_JSON is not valid JSON ({error}); pass --raw to send it as text") from None
        try:
            event_id = send_event(channel, event_type, data, id=key, raw=raw, durable=durable)
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        except InvalidEvent as error:
            raise CommandError(str(error)) from None
        except BrokerUnavailable as error:
            raise CommandError(f"the broker is unavailable: {error}") from None
        except (OperationalError, InterfaceError) as error:  # durably: the outbox's database
            raise CommandError(f"the database is unavailable: {error}") from None
        self.stdout.write("queued" if event_id is None else event_id)
