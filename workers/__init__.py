"""The worker side of latentstore: the only package that imports torch and diffusers.

``workers.autoencoders`` loads and caches autoencoders per process, ``workers.images`` turns PIL
images into padded tensors and back, ``workers.codec`` runs batched encode/decode. The web tier
never imports this package; it sends Celery tasks by name.
"""
