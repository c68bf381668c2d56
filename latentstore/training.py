"""``LatentDataset``: ready rows straight from the database as a torch ``IterableDataset``.

No export, no latent cache: a trainer reads the latents the rows already hold::

    from torch.utils.data import DataLoader
    from latentstore.training import LatentDataset

    ds = LatentDataset("demo.Photo.image", columns=["title"], shuffle=True, seed=0)
    for batch in DataLoader(ds, batch_size=32, num_workers=2):
        batch["latents"]  # (32, C, h, w) float32, model space: (raw - shift) * scaling

* **Each row once per epoch.** The primary keys of the ready rows are read once, when the
  dataset is made (with an origin check, as ``latents_export`` does: one latent space unless
  ``allow_mixed``). Every iteration orders them (shuffled by ``seed`` and the epoch, see
  :meth:`LatentDataset.set_epoch`) and deals them out round-robin to the ``world_size`` ranks,
  then each rank's to its DataLoader workers: the parts are disjoint and together hold every
  row, and a rank's rows do not depend on its number of workers.
* **Streamed.** Each worker fetches its rows a page at a time (``values_list`` of the primary
  key, the blob and the chosen columns), so memory holds one page, not the table.
* **Model space or raw**, in the ``dtype`` asked for, with each blob's own scaling and shift.
* **Bucketing** (``bucket_size=B``): yields batches of B latents that share a shape (pictures of
  one aspect ratio and size), ready for ``DataLoader(ds, batch_size=None)``.

This module imports torch, so it belongs to the training/worker side (``pip install
'latentstore[worker]'``); nothing in the web tier imports it.

DataLoader workers are forked from the process that made the dataset. A database connection
that process had open is not shared with them: each worker opens its own on first use and
leaves the inherited one alone (closing it would end the parent's session). With the ``spawn``
or ``forkserver`` start method, call ``django.setup()`` when your script is imported, so that the
workers can rebuild the dataset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # the web tier's install has no torch
    raise ImportError(
        "latentstore.training needs torch (it is the training side of latentstore): "
        "pip install 'latentstore[worker]'"
    ) from exc

from django.db import connections, models

from latentstore import samples
from latentstore.fields import LatentImageField
from latentstore.latents import LatentFormatError, blob_digest, unpack
from latentstore.queries import latent_fields_of

__all__ = ["LatentDataset"]

logger = logging.getLogger(__name__)

# Connections a forked DataLoader worker inherited from its parent. They are kept referenced
# and never closed here: closing (or garbage-collecting) one would send the server a
# "terminate" on the socket the parent still uses. The worker exits with os._exit, which runs
# no finalizers.
_INHERITED: list[Any] = []
_FRESH_IN: set[int] = set()


class LatentDataset(IterableDataset):
    """The ready latents of one LatentImageField as an iterable torch dataset.

    ``source`` is a queryset of the model (its filters select rows), the model class, or a
    label ``"app_label.Model.field"``; ``field`` names the LatentImageField when the label or
    the model does not say which. Samples are dicts: ``pk``, ``latents`` (a ``(C, h, w)``
    tensor), ``width``, ``height``, ``pad_right``, ``pad_bottom``, ``digest`` and the
    ``columns`` (with ``allow_mixed`` also the origin: ``autoencoder``, ``family``,
    ``fingerprint``, ``scaling_factor``, ``shift_factor``).

    ``rank``/``world_size`` default to ``torch.distributed``'s when it is initialised (else one
    rank). ``shuffle`` orders the rows by a permutation drawn from ``seed`` and the epoch (the
    same on every rank, so the parts stay disjoint). ``bucket_size`` yields batches of that many
    samples sharing a latent shape instead of single samples; ``drop_last`` then drops each
    worker's incomplete buckets at the end of an epoch (those rows are not seen that epoch).
    """

    def __init__(
        self,
        source: models.QuerySet | type[models.Model] | str,
        field: str | None = None,
        *,
        model_space: bool = True,
        dtype: torch.dtype = torch.float32,
        columns: Sequence[str] = (),
        shuffle: bool = False,
        seed: int = 0,
        page_size: int = 128,
        rank: int | None = None,
        world_size: int | None = None,
        bucket_size: int | None = None,
        drop_last: bool = False,
        allow_mixed: bool = False,
    ) -> None:
        super().__init__()
        model, latent_field, rows = _resolve(source, field)
        _check_arguments(dtype, page_size, bucket_size, rank, world_size)
        self.model = model
        self.field = latent_field
        self.model_space = model_space
        self.dtype = dtype
        try:
            self.columns = samples.column_specs(model, latent_field, tuple(columns))
        except samples.ExportError as exc:
            raise ValueError(str(exc).replace("--columns: ", "columns: ")) from None
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.page_size = page_size
        self.rank = rank
        self.world_size = world_size
        self.bucket_size = bucket_size
        self.drop_last = drop_last
        self.allow_mixed = allow_mixed
        ready = samples.ready_rows(rows, latent_field)
        # A Query, not a QuerySet: a QuerySet would be evaluated if the dataset were pickled
        # (spawned DataLoader workers); a Query pickles as the SQL to run.
        self._query = ready.query
        #: What the header scan found (origins, storage dtypes) when the dataset was made.
        self.scan = self._scan(ready)
        self._pks: list[Any] = self.scan.pks or []
        self._parent_pid = os.getpid()

    def _scan(self, ready: models.QuerySet) -> samples.OriginScan:
        """The header scan of the ready rows: one latent space (unless ``allow_mixed``), the
        primary keys of the readable rows, the unreadable ones logged."""
        scan = samples.scan_origins(ready, self.field, keep_pks=True)
        if not self.allow_mixed:
            try:
                scan.require_one("dataset")
            except samples.MixedOrigins as exc:
                raise samples.MixedOrigins(
                    str(exc)
                    .replace("--allow-mixed", "allow_mixed=True")
                    .replace("with --filter", "with a queryset"),
                    exc.origins,
                ) from None
        for pk, why in scan.bad.items():
            logger.warning("%s pk=%s left out: %s", self._label, pk, why)
        return scan

    @property
    def _label(self) -> str:
        return f"{self.model._meta.label}.{self.field.name}"

    def __repr__(self) -> str:
        space = "model space" if self.model_space else "raw"
        return f"<LatentDataset {self._label}: {len(self._pks)} rows, {space}, {self.dtype}>"

    @property
    def num_rows(self) -> int:
        """Ready rows found when the dataset was made (over every rank)."""
        return len(self._pks)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (call it before each epoch, as with DistributedSampler).

        DataLoader workers get a copy of the dataset when an epoch starts: with
        ``persistent_workers=True`` they keep the epoch they started with.
        """
        self.epoch = int(epoch)

    def rows_for(self, rank: int, world_size: int, worker: int = 0, workers: int = 1) -> list[Any]:
        """The primary keys that ``worker`` of ``rank`` reads this epoch, in order."""
        n = len(self._pks)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        # A rank's rows do not depend on how many workers it has: rank first, then worker.
        return [self._pks[i] for i in order[rank::world_size][worker::workers]]

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size  # type: ignore[return-value]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._own_connections()
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self._stream(self.rows_for(rank, world, worker, workers))
        if self.bucket_size is None:
            yield from stream
        else:
            yield from self._buckets(stream)

    # -- reading
    def _rows(self) -> models.QuerySet:
        rows = self.model._base_manager.all()
        rows.query = self._query
        return rows

    def _stream(self, pks: list[Any]) -> Iterator[dict[str, Any]]:
        names = ["pk", self.field.attname] + [c.attname for c in self.columns]
        rows = self._rows()
        for start in range(0, len(pks), self.page_size):
            page = pks[start : start + self.page_size]
            found = {values[0]: values for values in rows.filter(pk__in=page).values_list(*names)}
            for pk in page:
                values = found.get(pk)
                if values is None:  # no longer ready (re-encoding) or deleted since
                    continue
                try:
                    yield self._sample(values)
                except LatentFormatError as exc:
                    logger.warning("%s pk=%s left out: %s", self._label, pk, exc)

    def _sample(self, values: tuple[Any, ...]) -> dict[str, Any]:
        pk, blob = values[0], bytes(values[1])
        header, latents = unpack(blob)
        if self.model_space:
            latents = samples.model_space(latents, header)
        tensor = torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))
        if self.dtype != torch.float32:
            tensor = tensor.to(self.dtype)
        sample: dict[str, Any] = {
            "pk": pk if isinstance(pk, int) else str(pk),
            "latents": tensor,
            "width": header.width,
            "height": header.height,
            "pad_right": header.pad_right,
            "pad_bottom": header.pad_bottom,
            "digest": blob_digest(blob),
        }
        if self.allow_mixed:
            origin = samples.Origin.of(header)
            sample.update({name: getattr(origin, name) for name in samples.ORIGIN_FIELDS})
        for spec, value in zip(self.columns, values[2:], strict=True):
            sample[spec.name] = spec.to_json(value)
        return sample

    def _buckets(self, stream: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        buckets: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for sample in stream:
            bucket = buckets.setdefault(tuple(sample["latents"].shape), [])
            bucket.append(sample)
            if len(bucket) == self.bucket_size:
                yield _batch(bucket)
                bucket.clear()
        if not self.drop_last:
            for bucket in buckets.values():
                if bucket:
                    yield _batch(bucket)

    def _own_connections(self) -> None:
        """In a forked worker, set the parent's database connections aside (see above)."""
        pid = os.getpid()
        if pid == self._parent_pid or pid in _FRESH_IN:
            return
        for conn in connections.all(initialized_only=True):
            if conn.connection is not None:
                _INHERITED.append(conn.connection)
                conn.connection = None  # the next query connects afresh
        _FRESH_IN.add(pid)


def _batch(bucket: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples of one shape as a batch: stacked latents, int tensors, lists of the rest."""
    batch: dict[str, Any] = {"latents": torch.stack([s["latents"] for s in bucket])}
    for key in bucket[0]:
        if key == "latents":
            continue
        values = [s[key] for s in bucket]
        if key in ("width", "height", "pad_right", "pad_bottom"):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    return batch


def _check_arguments(
    dtype: torch.dtype,
    page_size: int,
    bucket_size: int | None,
    rank: int | None,
    world_size: int | None,
) -> None:
    """Refuse, with a ValueError, the arguments of a LatentDataset that cannot work."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    if page_size < 1:
        raise ValueError("page_size must be positive")
    if bucket_size is not None and bucket_size < 1:
        raise ValueError("bucket_size must be positive")
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")


def _resolve(
    source: models.QuerySet | type[models.Model] | str, field: str | None
) -> tuple[type[models.Model], LatentImageField, models.QuerySet]:
    if isinstance(source, str):
        label = source if field is None else f"{source}.{field}"
        try:
            model, latent_field = samples.resolve_field(label)
        except samples.ExportError as exc:
            raise ValueError(str(exc)) from None
        return model, latent_field, model._base_manager.all()
    if isinstance(source, models.QuerySet):
        model, rows = source.model, source
    elif isinstance(source, type) and issubclass(source, models.Model):
        model, rows = source, source._base_manager.all()
    else:
        raise TypeError(
            f"source must be a QuerySet, a model or 'app_label.Model.field', not {source!r}"
        )
    fields = latent_fields_of(model)
    if field is None:
        if len(fields) != 1:
            raise ValueError(
                f"{model._meta.label} has {len(fields)} LatentImageFields "
                f"({', '.join(f.name for f in fields) or 'none'}); pass field=..."
            )
        return model, fields[0], rows
    chosen = next((f for f in fields if f.name == field), None)
    if chosen is None:
        raise ValueError(f"{model._meta.label}.{field} is not a LatentImageField")
    return model, chosen, rows
