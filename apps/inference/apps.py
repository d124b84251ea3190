from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "apps.inference"
    label = "inference"

    def ready(self) -> None:
        # Attaches the OpenAPI descriptions to the views.
        from apps.inference import schema  # noqa: F401
