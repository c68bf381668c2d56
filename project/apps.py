from django.apps import AppConfig


class DemoConfig(AppConfig):
    """The example app: a Photo model, its admin and the demo command."""

    name = "project"
    label = "demo"
    default_auto_field = "django.db.models.BigAutoField"
