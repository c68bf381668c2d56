"""``manage.py latents_reencode``: encode rows again, with another autoencoder or new weights.

Rows are re-encoded from their originals: the staged upload of a failed row, or the kept
original (``KEEP_ORIGINAL`` / ``keep_original=True``). Re-encoding from decoded pixels is a
lossy round trip; it happens only with ``--from-decoded``, and the command then measures what it
costs: it waits for the first ``--measure`` rows to be encoded again, decodes them, and prints
the PSNR between the picture before and after (decode → re-encode → decode).

Selecting rows (combined with AND): ``--all``, ``--ids``, ``--failed``, ``--origin-mismatch``
(latents whose stamped weights are not what their autoencoder loads now: a weights update), or
``--autoencoder ALIAS`` alone (rows not on ALIAS yet). ``--autoencoder`` also names the
autoencoder to encode with; rows keep their own otherwise. Rows pending or encoding are left
alone. The run is resumable: rows already staged are not selected again, and an interrupted
run prints the ``--after`` that continues it.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from django.core.management.base import CommandError

from latentstore import conf, maintenance
from latentstore.fields import EMPTY, ENCODING, FAILED, PENDING, READY
from latentstore.latents import LatentHeader
from latentstore.management.base import LatentCommand, chunks

SOURCE_NAMES = {
    "staged": "staged uploads",
    "original": "kept originals",
    "decoded": "decoded pixels",
}


class Command(LatentCommand):
    help = (
        "Re-encode rows from their kept originals (or, with --from-decoded, from decoded pixels, "
        "printing the PSNR of the round trip), with another autoencoder or after a weights update."
    )

    def add_arguments(self, parser: Any) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--autoencoder",
            metavar="ALIAS",
            help="Encode with this autoencoder (rows get its alias). Alone, it selects the rows "
            "not encoded with it yet.",
        )
        parser.add_argument("--all", action="store_true", help="Every row that has an image.")
        parser.add_argument("--failed", action="store_true", help="Rows whose encode failed.")
        parser.add_argument(
            "--origin-mismatch",
            action="store_true",
            help="Rows whose latents were written by other weights than their autoencoder (or "
            "--autoencoder) loads now. Loads each autoencoder once to fingerprint it.",
        )
        parser.add_argument(
            "--from-decoded",
            action="store_true",
            help="Rows without a kept original: re-encode their decoded pixels (lossy).",
        )
        parser.add_argument(
            "--decoder",
            metavar="ALIAS",
            help="Decoder for --from-decoded and the PSNR check (default: the field's).",
        )
        parser.add_argument(
            "--measure",
            type=int,
            default=16,
            metavar="N",
            help="With --from-decoded: measure the PSNR on the first N rows (default 16).",
        )
        parser.add_argument(
            "--no-wait",
            action="store_true",
            help="With --from-decoded: do not wait for the workers to measure the PSNR.",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=600,
            help="Seconds to wait for the measured rows (default 600).",
        )
        self.add_row_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        pairs = self.selected_fields(options)
        settings = conf.get_settings()
        target = options["autoencoder"]
        if target is not None and target not in settings["AUTOENCODERS"]:
            raise CommandError(
                f"No autoencoder {target!r} in LATENTSTORE['AUTOENCODERS'] "
                f"(configured: {', '.join(sorted(settings['AUTOENCODERS']))})."
            )
        ids = [v for item in options["ids"] for v in str(item).split(",") if v.strip()]
        selectors = options["all"] or ids or options["failed"] or options["origin_mismatch"]
        if not selectors and target is None:
            raise CommandError(
                "Say which rows: --all, --ids, --failed, --origin-mismatch or --autoencoder ALIAS."
            )
        dry_run = options["dry_run"]
        report = maintenance.Report()
        measured: list[tuple[Any, Any, Any, bytes]] = []  # (model, field, pk, decoded before)
        verb = "would queue" if dry_run else "queued"
        plans = self._plans(pairs, options, target, bool(selectors))
        try:
            self._reencode(plans, options, report, measured)
        except KeyboardInterrupt:
            where = ""
            if self._last:
                label, pk = self._last
                where = f" (last row {label} pk={pk}; resume with --after {pk})"
            self.stdout.write(self._summary(report, verb))
            self.fail(f"Interrupted{where}.")

        self.stdout.write(self._summary(report, verb))
        problems = self._problems(report, measured, options)
        if problems:
            self.fail("latents_reencode: " + ". ".join(problems) + ".")

    def _plans(
        self, pairs: list[Any], options: dict[str, Any], target: str | None, selected: bool
    ) -> list[tuple[Any, Any, Any]]:
        """``(model, field, rows)`` to re-encode, as the options select them."""
        plans = []
        for model, field in pairs:
            state = field.companion_attname("state")
            rows = maintenance.small_rows(model).exclude(**{state: EMPTY})
            rows = self.restrict(rows, pairs, options)
            if options["failed"]:
                rows = rows.filter(**{state: FAILED})
            if options["origin_mismatch"]:
                rows = rows.filter(**{state: READY})
            if target is not None and not selected:
                rows = rows.exclude(**{field.companion_attname("autoencoder"): target})
            plans.append((model, field, rows))
        return plans

    def _reencode(
        self,
        plans: list[tuple[Any, Any, Any]],
        options: dict[str, Any],
        report: maintenance.Report,
        measured: list[tuple[Any, Any, Any, bytes]],
    ) -> None:
        """Stage every planned row again, in pages, noting the last one done in ``_last``."""
        target = options["autoencoder"]
        fingerprints: dict[str, str] = {}
        self._last: tuple[str, Any] | None = None
        for model, field, rows in plans:
            label = f"{model._meta.label}.{field.name}"
            batch = maintenance.EncodeBatch(model._meta.label, field.name)
            with self.progress(rows.count(), label) as progress, batch:
                for instances in chunks(rows, options["batch_size"]):
                    keep = {instance.pk for instance in instances}
                    if options["origin_mismatch"]:
                        keep = self._mismatched(model, field, list(keep), target, fingerprints)
                    for instance in instances:
                        if instance.pk in keep:
                            outcome = maintenance.reencode_row(
                                instance,
                                field,
                                autoencoder=target,
                                from_decoded=options["from_decoded"],
                                decoder=options["decoder"],
                                dry_run=options["dry_run"],
                                batch=batch,
                            )
                            report.add(outcome)
                            self._row_line(label, outcome, options["verbosity"])
                            if outcome.decoded is not None:
                                # A decode takes seconds: do not keep the workers waiting.
                                batch.flush()
                                if len(measured) < options["measure"]:
                                    measured.append((model, field, instance.pk, outcome.decoded))
                        progress.update()
                        self._last = (label, instance.pk)

    def _problems(
        self,
        report: maintenance.Report,
        measured: list[tuple[Any, Any, Any, bytes]],
        options: dict[str, Any],
    ) -> list[str]:
        """What the summary must end with when not everything could be done."""
        problems = []
        dry_run = options["dry_run"]
        if options["from_decoded"] and measured and not dry_run and not options["no_wait"]:
            problems += self._measure(measured, options)
        elif options["from_decoded"] and dry_run and report.sources.get("decoded"):
            self.stdout.write("PSNR: not measured in a dry run (nothing is encoded).")
        if report.skipped.get(maintenance.NO_ORIGINAL):
            problems.append(
                f"{report.skipped[maintenance.NO_ORIGINAL]} rows have no kept original; "
                "re-run with --from-decoded to re-encode their decoded pixels (lossy)"
            )
        if report.errors:
            shown = "; ".join(f"pk={pk}: {msg}" for pk, msg in list(report.errors.items())[:5])
            problems.append(f"{len(report.errors)} rows could not be staged: {shown}")
        return problems

    def _mismatched(
        self, model: Any, field: Any, chunk: list[Any], target: str | None, fps: dict[str, str]
    ) -> set[Any]:
        keep = set()
        for pk, header in maintenance.stamped_headers(model, field, chunk).items():
            if not isinstance(header, LatentHeader):
                keep.add(pk)  # unreadable latents: encode them again from the original
                continue
            alias = target or header.autoencoder
            if alias not in fps:
                try:
                    fps[alias] = maintenance.current_fingerprint(alias)
                except KeyError:
                    fps[alias] = ""  # not configured any more: nothing matches it
                except ImportError as exc:
                    raise CommandError(
                        f"--origin-mismatch loads the autoencoder to fingerprint its weights and "
                        f"needs the worker extra (pip install latentstore[worker]): {exc}"
                    ) from None
            if header.autoencoder != alias or header.fingerprint != fps[alias]:
                keep.add(pk)
        return keep

    def _row_line(self, label: str, outcome: maintenance.Outcome, verbosity: int) -> None:
        if verbosity < 2:
            return
        detail = outcome.source if outcome.action != "skipped" else outcome.reason
        self.stdout.write(f"{label} pk={outcome.pk}: {outcome.action} ({detail})")

    def _summary(self, report: maintenance.Report, verb: str) -> str:
        sources = ", ".join(
            f"{n} from {SOURCE_NAMES.get(s, s)}" for s, n in sorted(report.sources.items())
        )
        parts = [
            f"{verb} {report.staged} rows for re-encoding" + (f" ({sources})" if sources else "")
        ]
        if report.skipped:
            parts.append(
                "skipped "
                + ", ".join(f"{n} ({reason})" for reason, n in sorted(report.skipped.items()))
            )
        if report.errors:
            parts.append(f"{len(report.errors)} errors")
        return "; ".join(parts) + "."

    def _measure(self, measured: list[tuple[Any, Any, Any, bytes]], options: dict) -> list[str]:
        """Wait for the measured rows, decode them again, print the round trip's PSNR."""
        self.stdout.write(f"Waiting for {len(measured)} re-encoded rows to measure the PSNR...")
        deadline = time.monotonic() + options["timeout"]
        pending = {(m, f, pk) for m, f, pk, _ in measured}
        with self.progress(len(pending), "encoded", unit="rows") as progress:
            while pending and time.monotonic() < deadline:
                for m, f, pk in list(pending):
                    state = (
                        m._base_manager.filter(pk=pk)
                        .values_list(f.companion_attname("state"), flat=True)
                        .first()
                    )
                    if state not in (PENDING, ENCODING):
                        pending.discard((m, f, pk))
                        progress.update()
                if pending:
                    time.sleep(0.2)
        if pending:
            return [
                f"PSNR not measured: {len(pending)} of {len(measured)} rows still pending after "
                f"{options['timeout']:g} s (are workers running?)"
            ]
        values, problems = [], []
        for model, field, pk, before in measured:
            image = getattr(maintenance.small_rows(model).get(pk=pk), field.name)
            if image.state != READY:
                problems.append(f"pk={pk} is {image.state} after re-encoding: {image.error}")
                continue
            try:
                after = image.decoded_bytes(decoder=options["decoder"], format="PNG")
                values.append(maintenance.psnr(before, after))
            except Exception as exc:
                problems.append(f"pk={pk} could not be decoded again: {exc}")
        if values:
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                identical = len(values) - len(finite)
                self.stdout.write(
                    f"PSNR decode → re-encode → decode over {len(values)} rows: "
                    f"mean {statistics.fmean(finite):.2f} dB, min {min(finite):.2f} dB, "
                    f"max {max(finite):.2f} dB"
                    + (f" ({identical} identical)" if identical else "")
                    + " (the lossy round trip's cost; higher is closer)."
                )
            else:
                self.stdout.write(f"PSNR: all {len(values)} measured rows decode identically.")
        return ["PSNR check: " + "; ".join(problems)] if problems else []
