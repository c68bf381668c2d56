"""Training the small autoencoder that ships with latentstore (``workers/pretrained/ls-small``).

``python -m latentstore_workers.training.train`` rebuilds it from images that ship inside PyPI
packages (:mod:`latentstore_workers.training.data`); it needs the ``train`` extra (scikit-image,
scikit-learn, matplotlib). Nothing here runs in a worker or the web tier.
"""
