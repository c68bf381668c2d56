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
