"""``manage.py latents_warm``: decode rows into the cache ahead of their first view.

Pictures already in the cache are skipped, so a rerun continues where an interrupted one
stopped. By default the decodes run here (with the decoder's own ``RUN`` setting); with
``--enqueue`` they are sent to the decode workers and the command returns at once.
"""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.locmem import LocMemCache
from django.core.management.base import CommandError

from latentstore import conf
from latentstore.decoders import InvalidDecoderError, decoders
from latentstore.decoding import (
    decode_images,
    get_cache,
    key_for,
    normalise_format,
    schedule_warmup,
)
from latentstore.fields import READY
from latentstore.maintenance import small_rows
from latentstore.management.base import LatentCommand, chunks


class Command(LatentCommand):
    help = (
        "Pre-decode ready rows into the decode cache for a decoder, sizes and a format; "
        "skips what is cached already. Exits 1 if some rows could not be decoded."
    )

    def add_arguments(self, parser: Any) -> None:
        super().add_arguments(parser)
        parser.add_argument("--decoder", metavar="ALIAS", help="Default: each field's decoder.")
        parser.add_argument(
            "--size",
            type=int,
            nargs="+",
            action="extend",
            default=[],
            metavar="PX",
            help="Size boxes in pixels: --size 256 128, or --size 256 --size 128 "
            "(default: the original size).",
        )
        parser.add_argument(
            "--format", default="webp", help="webp (default, as URLs use), png or jpeg."
        )
        parser.add_argument(
            "--enqueue",
            action="store_true",
            help="Send decode tasks to the workers instead of decoding in this process.",
        )
        self.add_row_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            fmt = normalise_format(options["format"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if any(s < 1 for s in options["size"]):
            raise CommandError("--size must be positive.")
        sizes: list[int | None] = list(options["size"]) or [None]
        cache = get_cache()
        if isinstance(cache.shared, LocMemCache) and not options["enqueue"]:
            self.stderr.write(
                f"Note: LATENTSTORE['CACHE'] ({conf.get_settings()['CACHE']!r}) is a per-process "
                "LocMem cache; what this command decodes is gone when it exits."
            )
        counts = {"warmed": 0, "scheduled": 0, "cached": 0, "would warm": 0}
        errors: dict[str, str] = {}
        pairs = self.selected_fields(options)
        for model, field in pairs:
            label = f"{model._meta.label}.{field.name}"
            alias = options["decoder"] or field.decoder
            try:
                decoders[alias]
            except InvalidDecoderError as exc:
                raise CommandError(str(exc)) from None
            rows = small_rows(model).filter(**{field.companion_attname("state"): READY})
            rows = self.restrict(rows, pairs, options)
            total = rows.count()
            with self.progress(total * len(sizes), label, unit="pictures") as progress:
                for instances in chunks(rows, options["batch_size"]):
                    images = [getattr(instance, field.name) for instance in instances]
                    outcomes = [self._warm(images, alias, size, fmt, options) for size in sizes]
                    for row, instance in enumerate(instances):  # reported in row order
                        for nth, size in enumerate(sizes):
                            outcome, error = outcomes[nth][row]
                            counts[outcome] = counts.get(outcome, 0) + 1
                            if error is not None:
                                errors[self._where(images[row], size)] = error
                            if options["verbosity"] >= 2:
                                self.stdout.write(
                                    f"{label} pk={instance.pk} size={size or 'original'}: {outcome}"
                                )
                            progress.update()
        done = [f"{n} {what}" for what, n in counts.items() if n]
        self.stdout.write(
            f"{', '.join(done) or 'nothing to warm'} ({fmt}, sizes "
            f"{', '.join(str(s or 'original') for s in sizes)})"
            + (f"; {len(errors)} errors" if errors else "")
            + "."
        )
        if errors:
            shown = "; ".join(f"{where}: {msg}" for where, msg in list(errors.items())[:5])
            self.fail(f"latents_warm: {len(errors)} pictures could not be decoded: {shown}.")

    @staticmethod
    def _where(image: Any, size: int | None) -> str:
        return f"{image.field.model._meta.label} pk={image.instance.pk} size={size or 'original'}"

    def _warm(
        self, images: list[Any], alias: str, size: int | None, fmt: str, options: dict
    ) -> list[tuple[str, str | None]]:
        """Per image, the outcome of warming it at ``size`` and its error message (or None).

        The pictures not cached yet are decoded together: one :func:`decode_images` call, so the
        backend decodes them in batches (or ``decode_batch`` tasks do, for worker decoders).
        Rows sharing a blob share a picture: the first is decoded, the others count as cached
        (or failed, with its error), as if they had been warmed one after the other.
        """
        results: list[tuple[str, str | None]] = [("", None)] * len(images)
        shared = get_cache().shared
        todo: list[int] = []
        first: dict[str, int] = {}  # cache key -> the index that decodes it
        same: dict[int, int] = {}  # index -> the earlier index of the same picture
        for index, image in enumerate(images):
            try:
                key, _target = key_for(image, alias, size, fmt)
                # has_key, not get: presence is enough, the cached picture need not travel.
                if shared.has_key(key):
                    results[index] = ("cached", None)
                elif options["dry_run"]:
                    results[index] = ("would warm", None)
                elif options["enqueue"]:
                    sent = schedule_warmup(image, alias, size, fmt)
                    results[index] = ("scheduled" if sent else "already scheduled", None)
                elif key in first:
                    same[index] = first[key]
                else:
                    first[key] = index
                    todo.append(index)
            except Exception as exc:  # corrupt latents, a decoder that refuses them, a broker
                results[index] = ("failed", _message(exc))
        if todo:
            try:
                decoded = decode_images(
                    [images[i] for i in todo], alias, size, fmt, return_exceptions=True
                )
            except Exception as exc:  # the cache or the broker could not be reached at all
                decoded = [exc] * len(todo)
            for index, value in zip(todo, decoded, strict=True):
                if isinstance(value, Exception):  # a timeout, a failed or refused decode
                    results[index] = ("failed", _message(value))
                else:
                    results[index] = ("warmed", None)
        for index, earlier in same.items():
            outcome = results[earlier]
            results[index] = ("cached", None) if outcome[0] == "warmed" else outcome
        return results


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
