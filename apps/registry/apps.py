from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "apps.registry"
    label = "registry"

    def ready(self) -> None:
        # Attaches the OpenAPI descriptions to the views.
        from apps.registry import schema  # noqa: F401
