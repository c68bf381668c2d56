"""``manage.py latents_import app.Model.field --from OLD_FIELD``: bring existing images in.

Reads each row's file from the old ``ImageField``/``FileField`` (through that field's storage,
in bounded memory), validates it as an upload, stages it in the LatentImageField and sends the
encodes in batches after each committed page. Reruns skip what was imported (by the source's
sha256); bad sources are listed and leave their rows alone. ``--delete-source`` then deletes the
sources whose rows are ready. See :mod:`latentstore.importing` and docs/import-export.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.management.base import CommandError
from django.db import reset_queries

from latentstore import importing
from latentstore.management.base import LatentCommand


class Command(LatentCommand):
    help = (
        "Import the files of an ImageField/FileField into a LatentImageField of the same model: "
        "validated, staged in pages and encoded by the workers. Reruns skip imported rows; "
        "exits 1 if any row could not be imported."
    )

    def add_arguments(self, parser: Any) -> None:
        self.add_target_argument(parser)
        super().add_arguments(parser)
        parser.add_argument(
            "--from",
            dest="source",
            required=True,
            metavar="OLD_FIELD",
            help="The ImageField or FileField of the same model to read the files from.",
        )
        self.add_row_arguments(parser)
        parser.set_defaults(batch_size=100)
        parser.add_argument("--limit", type=int, metavar="N", help="Import at most N rows.")
        parser.add_argument(
            "--replace",
            action="store_true",
            help="Also import into rows whose latent field holds another image.",
        )
        parser.add_argument(
            "--delete-source",
            action="store_true",
            help="Afterwards, delete the source files of rows that are ready (quality gate "
            "passed, file unchanged, not shared with another row) and clear their old field.",
        )
        parser.add_argument(
            "--no-import",
            action="store_true",
            help="With --delete-source: only the delete pass (after the workers are done).",
        )
        parser.add_argument(
            "--report", metavar="PATH", help="Write the rows not imported as CSV: pk,source,reason."
        )
        parser.add_argument(
            "--no-verify",
            action="store_true",
            help="Check headers only (as uploads are); truncated files then fail on the workers.",
        )
        parser.add_argument(
            "--threads", type=int, default=None, help="Threads reading and checking files."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        model, field = self.one_field(options["target"], options)
        model, field, source = self._source_field(model, field, options)
        label = f"{model._meta.label}.{field.name}"
        self._rows_done = 0
        rows = self.field_rows(model, field, options)
        report = importing.ImportReport()
        interrupted = False
        try:
            if not options["no_import"]:
                report = self._import(model, field, source, rows, label, options)
            if options["delete_source"]:
                self._delete(model, field, source, rows, report, options)
        except KeyboardInterrupt:
            interrupted = True
        self._summary(label, source.name, report, options)
        if options["report"]:
            report.write_csv(options["report"])
            self.stdout.write(f"Report: {options['report']} ({report.failed} rows).")
        if interrupted:
            where = f"; resume with --after {report.last_pk}" if report.last_pk is not None else ""
            self.fail(f"Interrupted{where} (or simply run it again: imported rows are skipped).")
        if report.errors:
            self.fail(
                f"latents_import: {report.failed} rows could not be imported"
                + (f" (listed in {options['report']})" if options["report"] else "")
                + "; their rows are unchanged."
            )

    def _source_field(self, model: Any, field: Any, options: dict[str, Any]) -> tuple[Any, ...]:
        """The model, LatentImageField and ``--from`` field, once the options are checked."""
        try:
            model, field, source = importing.resolve(
                f"{model._meta.label}.{field.name}", options["source"]
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if options["batch_size"] < 1 or (options["limit"] is not None and options["limit"] < 1):
            raise CommandError("--batch-size and --limit must be positive.")
        if options["no_import"] and not options["delete_source"]:
            raise CommandError("--no-import goes with --delete-source.")
        return model, field, source

    def _import(
        self, model: Any, field: Any, source: Any, rows: Any, label: str, options: dict[str, Any]
    ) -> importing.ImportReport:
        """The import pass, with a progress bar."""
        total = rows.count()
        if options["limit"]:
            total = min(total, options["limit"])
        with self.progress(total, f"{label} <- {source.name}") as bar:
            return importing.import_images(
                model,
                field,
                source,
                rows,
                batch_size=options["batch_size"],
                limit=options["limit"],
                replace=options["replace"],
                dry_run=options["dry_run"],
                verify=not options["no_verify"],
                threads=options["threads"],
                progress=self._tick(bar, options["batch_size"]),
            )

    def _delete(
        self,
        model: Any,
        field: Any,
        source: Any,
        rows: Any,
        report: importing.ImportReport,
        options: dict[str, Any],
    ) -> None:
        """The ``--delete-source`` pass, with a progress bar, counted in ``report``."""
        candidates = rows.exclude(**{source.attname: ""})
        with self.progress(candidates.count(), f"delete {source.name}") as bar:
            importing.delete_sources(
                model,
                field,
                source,
                rows,
                batch_size=options["batch_size"],
                dry_run=options["dry_run"],
                threads=options["threads"],
                progress=self._tick(bar, options["batch_size"]),
                report=report,
            )

    def _tick(self, bar: Any, batch_size: int) -> Callable[[int], None]:
        """``bar.update`` that also drops Django's query log every ``batch_size`` rows."""

        def update(n: int = 1) -> None:
            bar.update(n)
            self._rows_done += n
            if self._rows_done % batch_size == 0:
                # Under DEBUG=True Django logs every query, staged bytes and all, as a
                # request would; drop the log as each request does.
                reset_queries()

        return update

    def _summary(
        self, label: str, source: str, report: importing.ImportReport, options: dict
    ) -> None:
        dry = options["dry_run"]
        out = self.stdout.write
        if not options["no_import"]:
            parts = [f"{'would import' if dry else 'imported'} {report.imported}"]
            parts += [f"skipped {n} ({why})" for why, n in sorted(report.skipped.items())]
            parts.append(f"failed {report.failed}")
            out(f"{label} <- {source}: " + ", ".join(parts) + ".")
            if report.imported and not dry:
                out("The workers encode them now; follow with: manage.py latents_status.")
        if options["delete_source"]:
            parts = [f"{'would delete' if dry else 'deleted'} {report.deleted} source files"]
            parts += [f"kept {n} ({why})" for why, n in sorted(report.kept.items())]
            out(", ".join(parts) + ".")
        if report.errors:
            out(f"Not imported ({report.failed}):")
            shown = report.errors if options["verbosity"] >= 2 else report.errors[:20]
            for pk, name, reason in shown:
                out(f"  pk={pk} {name}: {reason}")
            if len(shown) < len(report.errors):
                out(f"  ... and {len(report.errors) - len(shown)} more (--report PATH lists all).")
