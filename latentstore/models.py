"""latentstore's own table: what ``latents_import`` brought into each row.

Django imports this module when it loads the app, so it depends on Django alone.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class ImportRecord(models.Model):
    """One row's imported source: written in the same transaction that staged the row.

    ``latents_import`` judges "this row already holds this file" by ``sha256`` (of the source
    file's bytes; the latent blob's digest says nothing about the file it came from), and
    ``--delete-source`` deletes a source only while the row still carries ``token`` (the upload
    the import staged, not a later one).
    """

    id = models.BigAutoField(primary_key=True)
    model = models.CharField(max_length=200, help_text="app_label.ModelName of the row.")
    object_pk = models.CharField(max_length=255, help_text="The row's primary key, as text.")
    field = models.CharField(max_length=100, help_text="The LatentImageField imported into.")
    source_field = models.CharField(max_length=100, help_text="The FileField read from.")
    source = models.CharField(max_length=1024, help_text="The file's name in its storage.")
    sha256 = models.CharField(max_length=64)
    size = models.BigIntegerField(help_text="Bytes.")
    token = models.UUIDField(help_text="The token the import staged the row with.")
    imported_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["model", "object_pk", "field"], name="latentstore_import_one_per_row"
            )
        ]
        verbose_name = "import record"

    def __str__(self) -> str:
        return f"{self.model}.{self.field} pk={self.object_pk} <- {self.source}"
