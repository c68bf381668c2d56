"""``manage.py latents_sweep``: re-enqueue rows stuck pending/encoding past their lease.

The same logic runs every minute as the Celery beat task ``latentstore.sweep``; the command is
for a one-off run (after a broker outage, say) and for seeing what the sweeper would do.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from latentstore import conf, encoding
from latentstore.management.base import LatentCommand


class Command(LatentCommand):
    help = (
        "Re-enqueue rows left pending/encoding past LEASE_SECONDS (the broker may have lost "
        "their message) and mark failed those past MAX_ATTEMPTS. Exits 1 if some could not be "
        "sent to the broker."
    )

    def add_arguments(self, parser: Any) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--lease",
            type=float,
            default=None,
            metavar="SECONDS",
            help="Treat rows untouched for this long as stuck (default: LEASE_SECONDS).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settings = conf.get_settings()
        lease = settings["LEASE_SECONDS"] if options["lease"] is None else options["lease"]
        pairs = self.selected_fields(options)
        requeued = failed = not_sent = 0
        with self.progress(len(pairs), "sweeping", unit="fields", lines=False) as progress:
            for model, field in pairs:
                label = f"{model._meta.label}.{field.name}"
                if options["dry_run"]:
                    cutoff = timezone.now() - timedelta(seconds=lease)
                    stuck = encoding.stuck_rows(model, field, cutoff)
                    over = {f"{field.companion_attname('attempts')}__gte": settings["MAX_ATTEMPTS"]}
                    would_fail = stuck.filter(**over).count()
                    would_requeue = stuck.count() - would_fail
                    requeued += would_requeue
                    failed += would_fail
                    if options["verbosity"] >= 2:
                        self.stdout.write(
                            f"{label}: would re-enqueue {would_requeue}, would fail {would_fail}"
                        )
                else:
                    result = encoding.sweep(lease=lease, fields=[(model, field)])
                    requeued += result.requeued
                    failed += result.failed
                    not_sent += result.not_sent
                    if options["verbosity"] >= 2:
                        self.stdout.write(
                            f"{label}: re-enqueued {result.requeued}, failed {result.failed}, "
                            f"not sent {result.not_sent}"
                        )
                progress.update()
        if options["dry_run"]:
            self.stdout.write(
                f"would re-enqueue {requeued} stuck rows and mark {failed} failed "
                f"(lease {lease:g} s, {settings['MAX_ATTEMPTS']} attempts)."
            )
            return
        self.stdout.write(
            f"re-enqueued {requeued} stuck rows, marked {failed} failed "
            f"(lease {lease:g} s, {settings['MAX_ATTEMPTS']} attempts)."
        )
        if not_sent:
            self.fail(
                f"latents_sweep: {not_sent} of {requeued} rows could not be sent to the broker; "
                "they stay pending and the next sweep tries again."
            )
