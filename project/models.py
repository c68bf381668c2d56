"""The example model: a photo whose image lives in the database as VAE latents."""

from django.db import models

from latentstore.fields import LatentImageField


class Photo(models.Model):
    title = models.CharField(max_length=100)
    image = LatentImageField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "-pk"]

    def __str__(self) -> str:
        return self.title
