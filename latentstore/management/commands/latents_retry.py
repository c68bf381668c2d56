"""``manage.py latents_retry``: queue failed rows again (failed → pending, re-enqueued)."""

from __future__ import annotations

from typing import Any

from latentstore import maintenance
from latentstore.fields import FAILED
from latentstore.management.base import LatentCommand, chunks


class Command(LatentCommand):
    help = (
        "Queue failed rows again: a fresh token, attempts reset, state pending, the encode "
        "enqueued. Rows without a staged or kept original are reported (exit 1)."
    )

    def add_arguments(self, parser: Any) -> None:
        super().add_arguments(parser)
        self.add_row_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run = options["dry_run"]
        report = maintenance.Report()
        pairs = self.selected_fields(options)
        for model, field in pairs:
            label = f"{model._meta.label}.{field.name}"
            rows = maintenance.small_rows(model).filter(
                **{field.companion_attname("state"): FAILED}
            )
            rows = self.restrict(rows, pairs, options)
            total = rows.count()
            batch = maintenance.EncodeBatch(model._meta.label, field.name)
            with self.progress(total, label) as progress, batch:
                for instances in chunks(rows, options["batch_size"]):
                    for instance in instances:
                        outcome = maintenance.retry_row(
                            instance, field, dry_run=dry_run, batch=batch
                        )
                        report.add(outcome)
                        if options["verbosity"] >= 2:
                            detail = outcome.reason or outcome.source
                            self.stdout.write(
                                f"{label} pk={instance.pk}: {outcome.action} ({detail})"
                            )
                        progress.update()
        verb = "would queue" if dry_run else "queued"
        line = f"{verb} {report.staged} failed rows again"
        if report.skipped:
            line += "; skipped " + ", ".join(
                f"{n} ({reason})" for reason, n in sorted(report.skipped.items())
            )
        self.stdout.write(line + ".")
        unrecoverable = sum(
            n for reason, n in report.skipped.items() if reason.startswith("no staged")
        )
        problems = []
        if unrecoverable:
            problems.append(f"{unrecoverable} rows have no original to encode from (re-upload)")
        if report.errors:
            shown = "; ".join(f"pk={pk}: {msg}" for pk, msg in list(report.errors.items())[:5])
            problems.append(f"{len(report.errors)} rows could not be queued: {shown}")
        if problems:
            self.fail("latents_retry: " + ". ".join(problems) + ".")
