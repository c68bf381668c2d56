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
from latentstore.decoding import decode_bytes, get_cache, key_for, normalise_format, schedule_warmup
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
            action="append",
            default=[],
            metavar="PX",
            help="A size box in pixels (repeatable; default: the original size).",
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
                    for instance in instances:
                        image = getattr(instance, field.name)
                        for size in sizes:
                            outcome = self._warm(image, alias, size, fmt, options, errors)
                            counts[outcome] = counts.get(outcome, 0) + 1
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

    def _warm(
        self, image: Any, alias: str, size: int | None, fmt: str, options: dict, errors: dict
    ) -> str:
        where = f"{image.field.model._meta.label} pk={image.instance.pk} size={size or 'original'}"
        try:
            key, _target = key_for(image, alias, size, fmt)
            if get_cache().shared.has_key(key):
                return "cached"
            if options["dry_run"]:
                return "would warm"
            if options["enqueue"]:
                sent = schedule_warmup(image, alias, size, fmt)
                return "scheduled" if sent else "already scheduled"
            decode_bytes(image, alias, size=size, format=fmt)
        except Exception as exc:  # corrupt latents, a decoder that refuses them, a timeout
            errors[where] = f"{type(exc).__name__}: {exc}"
            return "failed"
        return "warmed"
