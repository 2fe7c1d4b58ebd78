from django.apps import AppConfig


class DemoConfig(AppConfig):
    """The demo site: the push service's first user.

    Installed so Django finds its templates (``templates/demo/``, and the
    login page under ``templates/registration/``), its static files
    (``static/demo/``) and its ``demo_user`` management command.
    """

    name = "config"
    label = "demo"
    verbose_name = "Live imports demo"
