"""``manage.py push_control disconnect USER`` / ``push_control unsubscribe USER CHANNEL``: end open streams now."""

from django.core.management.base import BaseCommand, CommandError

from myapp import control
from myapp.exceptions import BrokerUnavailable, InvalidEvent


class Command(BaseCommand):
    help = "End a user's open streams on every worker and host (see myapp.control)."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        disconnect = actions.add_parser("disconnect", help="end every stream of the user; push.js stops")
        disconnect.add_argument("user", help="the user's primary key")
        unsubscribe = actions.add_parser("unsubscribe", help="end the user's streams on CHANNEL; they reconnect")
        unsubscribe.add_argument("user", help="the user's primary key")
        unsubscribe.add_argument("channel", help="the channel, e.g. room:lobby")

    def handle(self, action, user, channel=None, **options):
        try:
            message_id = control.disconnect(user) if action == "disconnect" else control.unsubscribe(user, channel)
        except (InvalidEvent, ValueError) as error:
            raise CommandError(str(error)) from None
        except BrokerUnavailable as error:
            raise CommandError(f"the broker is unavailable: {error}") from None
        self.stdout.write(message_id)
