"""``manage.py latents_status``: rows per model, field, state and autoencoder; queue depths."""

from __future__ import annotations

import json
from typing import Any

from django.db.models import Avg, Count, Min
from django.utils import timezone

from latentstore import conf
from latentstore.broker import queue_depths
from latentstore.fields import ENCODING, PENDING, READY
from latentstore.management.base import LatentCommand
from latentstore.quality import QualityPolicy, low_fidelity_q


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


class Command(LatentCommand):
    help = (
        "Count rows per model, field, state and autoencoder; show the oldest pending row and how "
        "many encode/decode messages wait in the broker. Exits 1 if the broker cannot be asked."
    )

    def add_arguments(self, parser: Any) -> None:
        super().add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")
        parser.add_argument(
            "--no-queues", action="store_true", help="Do not ask the broker for queue depths."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        pairs = self.selected_fields(options)
        counts: list[dict[str, Any]] = []
        oldest: list[dict[str, Any]] = []
        quality: list[dict[str, Any]] = []
        total = 0 if options["json"] else len(pairs)
        with self.progress(total, "counting", unit="fields", lines=False) as progress:
            for model, field in pairs:
                counts += self._counts(model, field)
                waiting = self._oldest_waiting(model, field, timezone.now())
                if waiting is not None:
                    oldest.append(waiting)
                quality.append(self._quality(model, field))
                progress.update()

        settings = conf.get_settings()
        queues = []
        if not options["no_queues"]:
            names = list(dict.fromkeys([settings["ENCODE_QUEUE"], settings["DECODE_QUEUE"]]))
            queues = queue_depths(names)

        if options["json"]:
            self._print_json(counts, oldest, quality, queues)
        else:
            self._print_text(counts, oldest, quality, queues)
        unreachable = [q for q in queues if q.messages is None]
        if unreachable:
            self.fail(
                "Queue depth unknown for "
                + ", ".join(f"{q.queue} ({q.error})" for q in unreachable)
            )

    @staticmethod
    def _counts(model: Any, field: Any) -> list[dict[str, Any]]:
        """Rows per state and autoencoder of one field."""
        state, autoencoder = (
            field.companion_attname("state"),
            field.companion_attname("autoencoder"),
        )
        rows = model._base_manager.values(state, autoencoder).annotate(n=Count("pk"))
        return [
            {
                "model": model._meta.label,
                "field": field.name,
                "state": row[state],
                "autoencoder": row[autoencoder] or "-",
                "rows": row["n"],
            }
            for row in rows.order_by(state, autoencoder)
        ]

    @staticmethod
    def _oldest_waiting(model: Any, field: Any, now: Any) -> dict[str, Any] | None:
        """The row of one field that has waited longest for its encode, if any waits."""
        state, changed = field.companion_attname("state"), field.companion_attname("changed")
        attempts = field.companion_attname("attempts")
        waiting = model._base_manager.filter(**{f"{state}__in": [PENDING, ENCODING]})
        first = waiting.aggregate(t=Min(changed))["t"]
        if first is None:
            return None
        row = waiting.filter(**{changed: first}).values("pk", state, attempts).first()
        return {
            "model": model._meta.label,
            "field": field.name,
            "pk": row["pk"] if isinstance(row["pk"], int) else str(row["pk"]),
            "state": row[state],
            "attempts": row[attempts],
            "age_seconds": round((now - first).total_seconds(), 1),
        }

    def _print_json(
        self, counts: list[Any], oldest: list[Any], quality: list[Any], queues: list[Any]
    ) -> None:
        queue_rows = [{"queue": q.queue, "messages": q.messages, "error": q.error} for q in queues]
        self.stdout.write(
            json.dumps(
                {
                    "rows": counts,
                    "oldest_pending": oldest,
                    "quality": quality,
                    "queues": queue_rows,
                },
                indent=2,
            )
        )

    def _print_text(
        self, counts: list[Any], oldest: list[Any], quality: list[Any], queues: list[Any]
    ) -> None:
        self._print_table(counts)
        for item in oldest:
            self.stdout.write(
                f"oldest pending: {item['model']}.{item['field']} pk={item['pk']} "
                f"({item['state']}, {item['attempts']} attempts) waiting "
                f"{_age(item['age_seconds'])}"
            )
        if not oldest:
            self.stdout.write("oldest pending: none")
        for item in quality:
            self.stdout.write(self._quality_line(item))
        for q in queues:
            if q.messages is None:
                self.stdout.write(f"queue {q.queue}: unknown ({q.error})")
            else:
                self.stdout.write(f"queue {q.queue}: {q.messages} messages waiting")

    @staticmethod
    def _quality(model: Any, field: Any) -> dict[str, Any]:
        """Ready rows measured by the encode-time gate, their PSNR, and how many fall short."""
        threshold = QualityPolicy.for_field(field).min_psnr
        psnr = field.companion_attname("psnr")
        ready = model._base_manager.filter(**{field.companion_attname("state"): READY})
        numbers = ready.aggregate(
            ready=Count("pk"),
            measured=Count(psnr),
            mean=Avg(psnr),
            worst=Min(psnr),
            low=Count("pk", filter=low_fidelity_q(field, threshold)),
        )
        return {
            "model": model._meta.label,
            "field": field.name,
            "ready": numbers["ready"],
            "measured": numbers["measured"],
            "mean_psnr": None if numbers["mean"] is None else round(numbers["mean"], 2),
            "worst_psnr": None if numbers["worst"] is None else round(numbers["worst"], 2),
            "min_psnr": threshold,
            "low_fidelity": numbers["low"],
        }

    @staticmethod
    def _quality_line(item: dict[str, Any]) -> str:
        where = f"quality {item['model']}.{item['field']}:"
        if not item["measured"]:
            return f"{where} not measured (quality_check / QUALITY_CHECK off)"
        return (
            f"{where} {item['measured']} of {item['ready']} ready rows measured, "
            f"mean {item['mean_psnr']:.2f} dB, worst {item['worst_psnr']:.2f} dB, "
            f"{item['low_fidelity']} low fidelity (< {item['min_psnr']:g} dB)"
        )

    def _print_table(self, counts: list[dict[str, Any]]) -> None:
        header = ("model", "field", "state", "autoencoder", "rows")
        lines = [header] + [tuple(str(c[k]) for k in header) for c in counts]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for i, line in enumerate(lines):
            cells = [cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=False)]
            self.stdout.write("  ".join([*cells, line[-1].rjust(widths[-1])]))
            if i == 0:
                self.stdout.write("  ".join("-" * w for w in widths))
        if not counts:
            self.stdout.write("(no rows)")
