"""``manage.py push_relay``: publish the outbox to the broker in the foreground until stopped.

For deployments that want the relay outside the web workers (e.g. next to
the task worker, with MYAPP_OUTBOX_RELAY_IN_WORKERS = False). Several may
run, and alongside the workers' relays: one per database is active at a
time (docs/outbox.md). SIGTERM or Ctrl-C stops it after the current batch.
"""

import signal
import threading

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from myapp.outbox import runner


class Command(BaseCommand):
    help = "Publish durable events from the outbox to the broker, in order, until stopped (SIGTERM, Ctrl-C)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--database",
            action="append",
            dest="aliases",
            metavar="ALIAS",
            help="a database alias whose outbox to relay (repeatable); default MYAPP_OUTBOX_DATABASES",
        )

    def handle(self, aliases, **options):
        stopping = threading.Event()

        def stop(signum, frame):
            stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            relays = runner.start(aliases)
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        names = ", ".join(relay.source.alias for relay in relays.relays)
        self.stderr.write(f"push_relay: relaying the outbox of {names}; SIGTERM or Ctrl-C stops")
        while not stopping.wait(0.5):
            if not relays.alive():
                raise CommandError("push_relay: a relay thread ended unexpectedly")
        relays.stop()
        self.stderr.write("push_relay: stopped")
