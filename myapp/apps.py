from django.apps import AppConfig
from django.core.signals import setting_changed


def _reset_on_setting_change(setting, **kwargs):
    if setting.startswith("MYAPP_") or setting == "DATABASES":
        from myapp import brokers, hub

        hub.reset()
        brokers.reset()


class MyappConfig(AppConfig):
    name = "myapp"
    verbose_name = "Push service"

    def ready(self):
        from myapp import checks  # noqa: F401 - registers the system checks
        from myapp.brokers import load_broker
        from myapp.conf import setting

        # Fail at start-up, not at the first event: build one broker to check
        # BACKEND and OPTIONS (constructors do no I/O), then drop it.
        load_broker(setting("MYAPP_BROKER"))
        setting_changed.connect(_reset_on_setting_change, dispatch_uid="myapp-reset")
