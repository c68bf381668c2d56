"""What every ``latents_*`` command shares: row selection, progress, a summary, an exit code.

* ``--model app_label.Model`` (repeatable) and ``--field NAME`` pick the LatentImageFields
  (default: every one of every installed model).
* Progress is a tqdm bar on a terminal and plain lines (about every tenth) otherwise, so logs
  of cron jobs and CI stay readable.
* ``--dry-run`` says what would happen and changes nothing.
* A command that could not do all it was asked ends with a summary and exits non-zero.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.core.management.base import BaseCommand, CommandError
from django.db import models

from latentstore.fields import LatentImageField
from latentstore.queries import latent_fields_of


class Progress:
    """A tqdm bar on a TTY, plain ``label: done/total`` lines otherwise."""

    def __init__(
        self,
        command: BaseCommand,
        total: int,
        label: str,
        unit: str = "rows",
        lines: bool = True,
    ) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.done = 0
        self.lines = lines
        self._stdout = command.stdout
        self._bar = None
        self._printed = 0
        self._next_line = max(1, total // 10)
        if _isatty(command.stdout) and total:
            from tqdm import tqdm

            # tqdm redraws with carriage returns: give it the raw stream, not Django's
            # OutputWrapper, which appends a newline to every write.
            size = shutil.get_terminal_size((100, 20))
            self._bar = tqdm(
                total=total,
                desc=label,
                unit=unit[:-1] if unit.endswith("s") else unit,
                file=getattr(command.stdout, "_out", sys.stdout),
                # A terminal that reports a 0x0 size (a fresh pty, some CI runners) would
                # get no bar at all: tqdm hides bars below the screen's last row.
                ncols=size.columns,
                nrows=size.lines,
            )

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.lines and self.total and self.done >= self._next_line:
            self._line()

    def _line(self) -> None:
        pct = 100 * self.done // self.total if self.total else 100
        self._stdout.write(f"{self.label}: {self.done}/{self.total} {self.unit} ({pct}%)")
        self._printed = self.done
        step = max(1, self.total // 10)
        self._next_line = (self.done // step + 1) * step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.lines and self.total and self._printed != self.done:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LatentCommand(BaseCommand):
    """Base of the ``latents_*`` commands: ``--model``, ``--field``, ``--dry-run``, progress."""

    dry_run_option = True

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--model",
            action="append",
            default=[],
            metavar="APP_LABEL.MODEL",
            help="Only this model (repeatable). Default: every model with a LatentImageField.",
        )
        parser.add_argument(
            "--field",
            action="append",
            default=[],
            metavar="NAME",
            help="Only this LatentImageField (repeatable). Default: every one.",
        )
        if self.dry_run_option:
            parser.add_argument(
                "--dry-run",
                action="store_true",
                help="Say what would be done; change nothing and send nothing.",
            )

    def add_row_arguments(self, parser: Any) -> None:
        """``--ids``, ``--after`` and ``--batch-size`` (for commands that walk rows)."""
        parser.add_argument(
            "--ids",
            nargs="+",
            metavar="PK",
            default=[],
            help="Only these primary keys (also a,b,c); with one --model.",
        )
        parser.add_argument(
            "--after",
            metavar="PK",
            help="Resume after this primary key (an interrupted run prints it); with one --model.",
        )
        parser.add_argument(
            "--batch-size", type=int, default=200, help="Rows read per query (default 200)."
        )

    def restrict(
        self, rows: models.QuerySet, pairs: list[tuple[Any, Any]], options: dict[str, Any]
    ) -> models.QuerySet:
        """``rows`` limited to ``--ids`` and to primary keys past ``--after``."""
        ids = self.id_values(options)
        if not ids and not options["after"]:
            return rows
        if len({model for model, _field in pairs}) > 1:
            raise CommandError("--ids and --after need one --model: primary keys belong to it.")
        pk = rows.model._meta.pk
        try:
            if ids:
                rows = rows.filter(pk__in=[pk.to_python(v) for v in ids])
            if options["after"]:
                rows = rows.filter(pk__gt=pk.to_python(options["after"]))
        except Exception as exc:  # ValidationError of the primary key's type
            raise CommandError(f"--ids/--after: {exc}") from None
        return rows

    def id_values(self, options: dict[str, Any]) -> list[str]:
        """``--ids`` as a list of primary keys, an ``a,b,c`` value split."""
        return [v.strip() for item in options["ids"] for v in str(item).split(",") if v.strip()]

    def selected_fields(self, options: dict[str, Any]) -> list[tuple[type[models.Model], Any]]:
        """The (model, LatentImageField) pairs named by ``--model`` / ``--field``."""
        if options["model"]:
            models_ = []
            for label in options["model"]:
                try:
                    models_.append(apps.get_model(label))
                except (LookupError, ValueError):
                    raise CommandError(
                        f"Unknown model {label!r}; use app_label.ModelName "
                        f"(with a LatentImageField: {', '.join(_labels()) or 'none installed'})."
                    ) from None
        else:
            models_ = [m for m in apps.get_models() if latent_fields_of(m)]
        pairs = []
        for model in models_:
            fields = latent_fields_of(model)
            if options["field"]:
                chosen = []
                for name in options["field"]:
                    try:
                        field = model._meta.get_field(name)
                    except FieldDoesNotExist:
                        if options["model"]:
                            raise CommandError(
                                f"{model._meta.label} has no field {name!r} "
                                f"(its LatentImageFields: {', '.join(f.name for f in fields)})."
                            ) from None
                        continue
                    if not isinstance(field, LatentImageField):
                        raise CommandError(f"{model._meta.label}.{name} is not a LatentImageField.")
                    chosen.append(field)
                fields = chosen
            if not fields and options["model"]:
                raise CommandError(f"{model._meta.label} has no LatentImageField.")
            pairs += [(model, f) for f in fields]
        if not pairs:
            raise CommandError("No LatentImageField matches --model/--field.")
        return pairs

    def progress(self, total: int, label: str, unit: str = "rows", lines: bool = True) -> Progress:
        """A bar on a terminal; else plain lines about every tenth (none with ``lines=False``)."""
        return Progress(self, total, label, unit, lines)

    def fail(self, summary: str) -> None:
        """End the command with ``summary`` and a non-zero exit status."""
        raise CommandError(summary, returncode=1)

    def add_target_argument(self, parser: Any) -> None:
        """The optional ``app_label.Model.field`` that :meth:`one_field` reads."""
        parser.add_argument(
            "target", nargs="?", metavar="APP_LABEL.MODEL.FIELD", help="The LatentImageField."
        )

    def one_field(self, target: str | None, options: dict[str, Any]) -> tuple[Any, Any]:
        """The one (model, LatentImageField) named by ``app_label.Model.field`` or ``--model``
        (and ``--field`` where the model has several): for commands that work on one field."""
        if target:
            if options["model"] or options["field"]:
                raise CommandError("Name the field either as app_label.Model.field or by --model.")
            parts = target.split(".")
            if len(parts) != 3:
                raise CommandError(f"{target!r}: name the field as app_label.Model.field.")
            options = {**options, "model": [".".join(parts[:2])], "field": [parts[2]]}
        elif not options["model"]:
            raise CommandError("Name the field: app_label.Model.field (or --model and --field).")
        pairs = self.selected_fields(options)
        if len(pairs) != 1:
            names = ", ".join(f"{m._meta.label}.{f.name}" for m, f in pairs)
            raise CommandError(f"Name one field (--field); this selects {names}.")
        return pairs[0]

    def field_rows(
        self, model: type[models.Model], field: Any, options: dict[str, Any]
    ) -> models.QuerySet:
        """The rows of :meth:`one_field`'s model that ``--ids`` and ``--after`` select."""
        return self.restrict(model._base_manager.all(), [(model, field)], options)


def _labels() -> Iterator[str]:
    for model in apps.get_models():
        if latent_fields_of(model):
            yield model._meta.label


def chunks(queryset: models.QuerySet, size: int = 500) -> Iterator[list[models.Model]]:
    """The rows of ``queryset`` in primary key order, a page at a time (keyset pagination).

    Rows changed by the caller between pages do not shift the pages.
    """
    last = None
    while True:
        page = queryset.order_by("pk")
        if last is not None:
            page = page.filter(pk__gt=last)
        rows = list(page[:size])
        if not rows:
            return
        yield rows
        last = rows[-1].pk
