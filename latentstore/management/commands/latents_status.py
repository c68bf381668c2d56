"""``manage.py latents_status``: rows per model, field, state and autoencoder; queue depths."""

from __future__ import annotations

import json
from typing import Any

from django.db.models import Count, Min
from django.utils import timezone

from latentstore import conf
from latentstore.broker import queue_depths
from latentstore.fields import ENCODING, PENDING
from latentstore.management.base import LatentCommand


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
        now = timezone.now()
        pairs = self.selected_fields(options)
        counts: list[dict[str, Any]] = []
        oldest: list[dict[str, Any]] = []
        quiet = options["json"]
        total = 0 if quiet else len(pairs)
        with self.progress(total, "counting", unit="fields", lines=False) as progress:
            for model, field in pairs:
                state, autoencoder = (
                    field.companion_attname("state"),
                    field.companion_attname("autoencoder"),
                )
                rows = model._base_manager.values(state, autoencoder).annotate(n=Count("pk"))
                for row in rows.order_by(state, autoencoder):
                    counts.append(
                        {
                            "model": model._meta.label,
                            "field": field.name,
                            "state": row[state],
                            "autoencoder": row[autoencoder] or "-",
                            "rows": row["n"],
                        }
                    )
                waiting = model._base_manager.filter(**{f"{state}__in": [PENDING, ENCODING]})
                first = waiting.aggregate(t=Min(field.companion_attname("changed")))["t"]
                if first is not None:
                    row = (
                        waiting.filter(**{field.companion_attname("changed"): first})
                        .values("pk", state, field.companion_attname("attempts"))
                        .first()
                    )
                    oldest.append(
                        {
                            "model": model._meta.label,
                            "field": field.name,
                            "pk": row["pk"] if isinstance(row["pk"], int) else str(row["pk"]),
                            "state": row[state],
                            "attempts": row[field.companion_attname("attempts")],
                            "age_seconds": round((now - first).total_seconds(), 1),
                        }
                    )
                progress.update()

        settings = conf.get_settings()
        queues = []
        if not options["no_queues"]:
            names = list(dict.fromkeys([settings["ENCODE_QUEUE"], settings["DECODE_QUEUE"]]))
            queues = queue_depths(names)

        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "rows": counts,
                        "oldest_pending": oldest,
                        "queues": [
                            {"queue": q.queue, "messages": q.messages, "error": q.error}
                            for q in queues
                        ],
                    },
                    indent=2,
                )
            )
        else:
            self._print_table(counts)
            for item in oldest:
                self.stdout.write(
                    f"oldest pending: {item['model']}.{item['field']} pk={item['pk']} "
                    f"({item['state']}, {item['attempts']} attempts) waiting "
                    f"{_age(item['age_seconds'])}"
                )
            if not oldest:
                self.stdout.write("oldest pending: none")
            for q in queues:
                if q.messages is None:
                    self.stdout.write(f"queue {q.queue}: unknown ({q.error})")
                else:
                    self.stdout.write(f"queue {q.queue}: {q.messages} messages waiting")
        unreachable = [q for q in queues if q.messages is None]
        if unreachable:
            self.fail(
                "Queue depth unknown for "
                + ", ".join(f"{q.queue} ({q.error})" for q in unreachable)
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
