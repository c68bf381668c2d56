"""The worker side of latentstore: the only package that imports torch and diffusers.

``workers.autoencoders`` loads and caches autoencoders per process (precision, layout,
compilation, tiling); ``workers.images`` turns PIL images into padded tensors and back;
``workers.memory`` knows budgets, peaks and what running out of memory looks like;
``workers.batching`` runs items in memory-bounded batches, splitting on out-of-memory and
re-running overflowed items in float32; ``workers.codec`` holds the encode and decode jobs;
``workers.pipeline`` is one encode task's claim → pixels → batches → write-back; and
``workers.tasks`` the Celery tasks. The web tier never imports this package; it sends Celery
tasks by name.
"""
