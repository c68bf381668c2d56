"""``manage.py latents_export app.Model.field --out DIR``: a training set straight from the table.

Writes the ready rows' latents as Parquet shards (``--format hf``, for Hugging Face
``datasets``) or tar shards (``--format webdataset``), with a dataset card (``README.md`` and
``latentstore.json``) that says exactly what a latent is here. Resumable by shard: rerun the
same command after an interruption. The work is done by :mod:`latentstore.exports`.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from django.core.management.base import CommandError

from latentstore import exports, samples
from latentstore.management.base import LatentCommand


class Command(LatentCommand):
    help = (
        "Export the ready latents of app_label.Model.field as a training set: Parquet shards "
        "for Hugging Face datasets (--format hf) or WebDataset tar shards, with a dataset card. "
        "Resumable: rerun the same command to continue an interrupted export."
    )

    def add_arguments(self, parser: Any) -> None:
        self.add_target_argument(parser)
        super().add_arguments(parser)  # --model, --field (instead of the target), --dry-run
        parser.add_argument("--out", required=True, metavar="DIR", help="Output folder.")
        self._add_shard_arguments(parser)
        self._add_content_arguments(parser)
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="Remove an earlier export in --out (its shards, progress file and card) and "
            "start again.",
        )
        self.add_row_arguments(parser)

    def _add_shard_arguments(self, parser: Any) -> None:
        """``--format``, ``--shard-size``, ``--dtype`` and ``--model-space``/``--raw``."""
        parser.add_argument(
            "--format",
            choices=exports.FORMATS,
            default="hf",
            help="hf: Parquet shards for datasets.load_dataset('parquet', data_dir=DIR) "
            "(default); webdataset: tar shards of KEY.npy + KEY.json.",
        )
        parser.add_argument(
            "--shard-size",
            default="256MB",
            metavar="BYTES",
            help="Start a new shard past this size: bytes, or with K/M/G (default 256MB).",
        )
        parser.add_argument(
            "--dtype",
            choices=exports.OUT_DTYPES,
            default="float16",
            help="dtype of the exported latents (default float16, as stored).",
        )
        space = parser.add_mutually_exclusive_group()
        space.add_argument(
            "--model-space",
            action="store_true",
            help="Apply the family's scaling and shift, (raw - shift) * scaling, as trainers "
            "expect.",
        )
        space.add_argument(
            "--raw",
            dest="model_space",
            action="store_false",
            help="Export the stored latent_dist.mean unchanged (default).",
        )

    def _add_content_arguments(self, parser: Any) -> None:
        """``--columns``, ``--filter`` and ``--allow-mixed``: what the samples hold."""
        parser.add_argument(
            "--columns",
            default="",
            metavar="NAME,NAME",
            help="Model columns exported beside each latent, e.g. title,caption.",
        )
        parser.add_argument(
            "--filter",
            metavar="JSON",
            help='Only rows matching these queryset lookups, e.g. {"title__startswith": "a"}.',
        )
        parser.add_argument(
            "--allow-mixed",
            action="store_true",
            help="Export rows of several autoencoders/weights, recording the origin per row "
            "(refused otherwise).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        model, field = self.one_field(options["target"], options)
        try:
            exporter = self._exporter(model, field, options)
        except exports.ExportError as exc:
            raise CommandError(str(exc)) from None
        with exporter:
            try:
                plan = exporter.prepare(dry_run=options["dry_run"])
            except exports.ExportError as exc:
                raise CommandError(str(exc)) from None
            self._plan_lines(exporter, plan, options)
            if options["dry_run"]:
                return
            label = f"{exporter.label} → {exporter.out}"
            try:
                with self.progress(plan.todo, label) as progress:
                    result = exporter.run(on_row=progress.update, plan=plan)
            except KeyboardInterrupt:
                self.fail(
                    "Interrupted: the finished shards are kept. Rerun the same command to "
                    "continue after the last of them."
                )
            except exports.ExportError as exc:
                raise CommandError(str(exc)) from None
        self._result_lines(exporter, result)

    def _exporter(self, model: Any, field: Any, options: dict[str, Any]) -> exports.Exporter:
        """The Exporter that the options ask for (an ExportError when they cannot work)."""
        shard_size = exports.parse_size(options["shard_size"])
        rows = self.field_rows(model, field, options)
        lookups = None
        if options["filter"]:
            lookups = samples.parse_filter(options["filter"])
            rows = samples.apply_filter(rows, lookups)
        columns = tuple(c.strip() for c in options["columns"].split(",") if c.strip())
        settings = exports.ExportOptions(
            format=options["format"],
            dtype=options["dtype"],
            model_space=options["model_space"],
            columns=columns,
            filter=lookups,
            ids=tuple(self.id_values(options)),
            after=options["after"],
            allow_mixed=options["allow_mixed"],
            shard_size=shard_size,
            page_size=options["batch_size"],
            overwrite=options["overwrite"] and not options["dry_run"],
        )
        command_line = "manage.py latents_export " + shlex.join(sys.argv[2:])
        if sys.argv[1:2] != ["latents_export"]:  # call_command(): rebuild it from options
            command_line = _command_line(f"{model._meta.label}.{field.name}", options, columns)
        return exports.Exporter(
            model, field, options["out"], settings, rows=rows, command_line=command_line
        )

    def _result_lines(self, exporter: exports.Exporter, result: exports.ExportResult) -> None:
        """What the run wrote; a failure listing the rows it could not read."""
        rate = result.rows / result.seconds if result.seconds else 0.0
        self.stdout.write(
            f"Exported {result.rows} rows in {result.shards} shards "
            f"({result.bytes / 1e6:.1f} MB) in {result.seconds:.2f} s ({rate:.0f} rows/s); "
            f"the dataset in {exporter.out} now holds {result.total} rows "
            f"(card: {exports.CARD_README}, {exports.CARD_JSON})."
        )
        if result.skipped:
            shown = "; ".join(f"pk={pk}: {why}" for pk, why in list(result.skipped.items())[:5])
            self.fail(
                f"latents_export: {len(result.skipped)} rows could not be read and were left "
                f"out: {shown}."
            )

    def _plan_lines(self, exporter: exports.Exporter, plan: exports.Plan, options: dict) -> None:
        scan = plan.scan
        for origin, count in scan.origins.items():
            self.stdout.write(f"{count} ready rows from {origin.describe()}.")
        if plan.resume_after is not None:
            self.stdout.write(
                f"Resuming after pk={plan.resume_after}: {plan.shards_done} shards done, "
                f"{plan.todo} rows to go."
            )
        if scan.bad:
            self.stderr.write(f"{len(scan.bad)} rows have unreadable latents; they are left out.")
        if options["dry_run"]:
            space = "model space" if exporter.options.model_space else "raw"
            self.stdout.write(
                f"Would export {plan.todo} rows ({exporter.options.format}, "
                f"{exporter.options.dtype}, {space}) to {exporter.out}."
            )
        elif not scan.rows and plan.resume_after is None:
            raise CommandError(f"No ready rows of {exporter.label} match; nothing to export.")


def _command_line(label: str, options: dict[str, Any], columns: tuple[str, ...]) -> str:
    parts = ["manage.py", "latents_export", label, "--out", str(options["out"])]
    parts += ["--format", options["format"], "--dtype", options["dtype"]]
    if options["model_space"]:
        parts.append("--model-space")
    if columns:
        parts += ["--columns", ",".join(columns)]
    if options["filter"]:
        parts += ["--filter", options["filter"]]
    if options["ids"]:
        parts += ["--ids", *map(str, options["ids"])]
    if options["after"]:
        parts += ["--after", str(options["after"])]
    if options["allow_mixed"]:
        parts.append("--allow-mixed")
    return shlex.join(parts)
