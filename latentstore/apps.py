from django.apps import AppConfig


class LatentstoreConfig(AppConfig):
    """latentstore: images stored as VAE latents."""

    name = "latentstore"
    verbose_name = "Latent images"

    def ready(self) -> None:
        from latentstore import checks, wiring  # noqa: F401  (registers the system checks)
