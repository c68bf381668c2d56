"""The worker side of latentstore: the only package that imports torch and diffusers.

``latentstore_workers.autoencoders`` loads and caches autoencoders per process (precision, layout,
compilation, tiling); ``latentstore_workers.images`` turns PIL images into padded tensors and back;
``latentstore_workers.memory`` knows budgets, peaks and what running out of memory looks like;
``latentstore_workers.batching`` runs items in memory-bounded batches, splitting on
out-of-memory and re-running overflowed items in float32; ``latentstore_workers.codec`` holds
the encode and decode jobs; ``latentstore_workers.pipeline`` is one encode task's claim → pixels
→ batches → write-back; and ``latentstore_workers.tasks`` the Celery tasks. The web tier never
imports this package; it sends Celery tasks by name.

The repository keeps this code in ``workers/``; it installs as ``latentstore_workers`` so that it
never collides with a project's own ``workers`` module.
"""
