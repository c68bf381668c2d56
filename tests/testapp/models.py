"""Models used only by the tests."""

import uuid

from django.db import models

from latentstore.fields import LatentImageField


class Item(models.Model):
    """A UUID primary key and a field with non-default options."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=50, blank=True)
    picture = LatentImageField(blank=True, keep_original=True, latent_dtype="int8")


class AbstractPictured(models.Model):
    image = LatentImageField(blank=True)

    class Meta:
        abstract = True


class Poster(AbstractPictured):
    """Inherits its LatentImageField from an abstract base."""

    caption = models.CharField(max_length=50, blank=True)


def legacy_s3_storage():
    """The S3 storage of ``LegacyS3.old`` (tests/settings.py: moto's server through
    django-storages); the default storage where django-storages is not installed."""
    from django.core.files.storage import default_storage, storages

    try:
        return storages["s3"]
    except Exception:  # django-storages or boto3 missing: the S3 tests skip
        return default_storage


class Legacy(models.Model):
    """A site's existing model: pictures in an ImageField, the LatentImageField added beside it
    (for latents_import and latents_export_images)."""

    title = models.CharField(max_length=50, blank=True)
    old = models.ImageField(upload_to="legacy/", blank=True, max_length=255)
    attachment = models.FileField(upload_to="legacy/", blank=True, max_length=255)
    image = LatentImageField(blank=True)


class LegacyS3(models.Model):
    """Pictures on S3 (moto) imported into a field that keeps its originals."""

    old = models.ImageField(
        storage=legacy_s3_storage, upload_to="legacy/", blank=True, max_length=255
    )
    image = LatentImageField(blank=True, keep_original=True)
