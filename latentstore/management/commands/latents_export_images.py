"""``manage.py latents_export_images app.Model.field --to TARGET``: a way back out.

Writes each ready row's kept original (``--kind original``) or decoded picture (``--kind
decoded``, ``--format png|webp|jpeg``) to a ``STORAGES`` alias or a directory, with a manifest
CSV (pk, path, width, height, digest, kind). Resumable: rows already in the manifest with the
same digest are skipped. See :mod:`latentstore.exporting`.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from latentstore import exporting
from latentstore.columns import READY
from latentstore.management.base import LatentCommand


class Command(LatentCommand):
    help = (
        "Export ready rows as image files (kept originals or decoded pictures) to a storage "
        "alias or a directory, with a manifest CSV; resumable. Exits 1 if some rows failed."
    )

    def add_arguments(self, parser: Any) -> None:
        self.add_target_argument(parser)
        super().add_arguments(parser)
        parser.add_argument(
            "--to", required=True, metavar="STORAGE_ALIAS_OR_DIR", help="Where to write."
        )
        parser.add_argument("--kind", choices=exporting.KINDS, default="decoded")
        parser.add_argument(
            "--format",
            default=None,
            help="png (default), webp or jpeg: for --kind decoded (originals stay as they are).",
        )
        parser.add_argument("--size", type=int, metavar="PX", help="Fit decodes into PX x PX.")
        parser.add_argument("--decoder", metavar="ALIAS", help="Default: the field's decoder.")
        parser.add_argument("--limit", type=int, metavar="N", help="Export at most N rows.")
        self.add_row_arguments(parser)
        parser.set_defaults(batch_size=50)

    def handle(self, *args: Any, **options: Any) -> None:
        model, field = self.one_field(options["target"], options)
        kind = options["kind"]
        fmt, storage, where = self._destination(options)
        label = f"{model._meta.label}.{field.name}"
        rows = self.field_rows(model, field, options)
        total = rows.filter(**{field.companion_attname("state"): READY}).count()
        if options["limit"]:
            total = min(total, options["limit"])
        interrupted = False
        report = exporting.ExportReport()
        try:
            with self.progress(total, f"export {label}", unit="pictures") as bar:
                report = exporting.export_images(
                    model,
                    field,
                    storage,
                    kind=kind,
                    format=fmt,
                    size=options["size"],
                    decoder=options["decoder"],
                    rows=rows,
                    batch_size=options["batch_size"],
                    limit=options["limit"],
                    dry_run=options["dry_run"],
                    progress=bar.update,
                )
        except ValueError as exc:  # a file where the manifest should be, not ours
            raise CommandError(str(exc)) from None
        except KeyboardInterrupt:
            interrupted = True
        self._summary(report, label, where, fmt, options)
        if interrupted:
            self.fail("Interrupted; run it again to continue (rows in the manifest are skipped).")
        self._fail_on_problems(report)

    def _destination(self, options: dict[str, Any]) -> tuple[str, Any, str]:
        """The picture format, the target storage and its name, once the options are checked."""
        if options["kind"] == "original" and (
            options["format"] or options["size"] or options["decoder"]
        ):
            raise CommandError(
                "--format, --size and --decoder are for --kind decoded; originals are written "
                "byte for byte."
            )
        if options["size"] is not None and options["size"] < 1:
            raise CommandError("--size must be positive.")
        fmt = options["format"] or "png"
        try:
            exporting.normalise_format(fmt)
            storage, where = exporting.target_storage(options["to"])
        except (ValueError, OSError) as exc:
            raise CommandError(str(exc)) from None
        return fmt, storage, where

    def _summary(
        self,
        report: exporting.ExportReport,
        label: str,
        where: str,
        fmt: str,
        options: dict[str, Any],
    ) -> None:
        """One line of what was exported and skipped, the manifest, the first failures."""
        verb = "would export" if options["dry_run"] else "exported"
        kind = options["kind"]
        what = "kept originals" if kind == "original" else f"decoded pictures ({fmt.lower()})"
        parts = [f"{verb} {report.exported} {what} of {label} to {where}"]
        parts += [f"skipped {n} ({why})" for why, n in sorted(report.skipped.items())]
        if report.errors:
            parts.append(f"failed {len(report.errors)}")
        self.stdout.write("; ".join(parts) + ".")
        if report.manifest and not options["dry_run"]:
            self.stdout.write(f"Manifest: {report.manifest}")
        for pk, reason in report.errors[:20]:
            self.stdout.write(f"  pk={pk}: {reason}")

    def _fail_on_problems(self, report: exporting.ExportReport) -> None:
        """Exit non-zero when rows failed or had no kept original to export."""
        problems = []
        if report.errors:
            problems.append(f"{len(report.errors)} rows could not be exported")
        if report.skipped.get(exporting.NO_ORIGINAL):
            problems.append(
                f"{report.skipped[exporting.NO_ORIGINAL]} rows have no kept original "
                "(export them with --kind decoded)"
            )
        if problems:
            self.fail("latents_export_images: " + "; ".join(problems) + ".")
