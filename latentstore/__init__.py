"""latentstore: store images in the database as VAE latents."""

__version__ = "0.1.0"
