"""The dataset card of an export: ``latentstore.json`` and a ``README.md`` with Hugging Face
front matter, saying what a latent is here and how to read the shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import latentstore
from latentstore.samples import ORIGIN_FIELDS, ColumnSpec, OriginScan, json_pk
from latentstore.shards import DATA_DIR, EXTENSIONS

__all__ = ["CARD_VERSION", "build_card", "card_markdown", "read_snippets"]

CARD_VERSION = 1


def build_card(
    *,
    label: str,
    field: str,
    options: Any,
    state: dict[str, Any],
    specs: list[ColumnSpec],
    pk_type: str,
    scan: OriginScan | None,
    out: Path,
    command: str,
    created: str,
) -> dict[str, Any]:
    """The dataset card (``latentstore.json``) of an export: ``options`` are its
    :class:`~latentstore.exports.ExportOptions`, ``state`` its progress file."""
    o = options
    shards = state["shards"]
    origins = state["origins"]
    return {
        "latentstore_export": CARD_VERSION,
        "latentstore_version": latentstore.__version__,
        "format": o.format,
        "source": {
            "model": label,
            "field": field,
            "filter": o.filter,
            "ids": [json_pk(v) for v in o.ids],
            "after": json_pk(o.after),
            "command": command,
        },
        "count": sum(s["rows"] for s in shards),
        "dtype": o.dtype,
        "latents": _latents_entry(o.model_space, scan),
        "autoencoder": _autoencoder_entry(o, state),
        "mixed_origins": bool(o.allow_mixed and len(origins) > 1),
        "origins": origins,
        "padding": "Pictures were padded on the right and bottom to a multiple of the "
        "downsample factor before encoding (edge pixels repeated, as the encoder saw them). "
        "Decode (w*downsample, h*downsample) pixels, then crop to `crop` "
        "(0, 0, width, height).",
        "columns": _columns_entry(label, o, specs, pk_type),
        "shards": [dict(s) for s in shards],
        "skipped": dict(state["skipped"]),
        "created": created,
        "read": read_snippets(out, o.format, len(shards)),
    }


def _autoencoder_entry(options: Any, state: dict[str, Any]) -> dict[str, Any] | None:
    """The card's ``autoencoder``: the one origin of the rows, or None when they mix several."""
    single = state.get("origin") if not options.allow_mixed else None
    if single is None and len(state["origins"]) == 1:
        single = {k: v for k, v in state["origins"][0].items() if k != "rows"}
    if single is None:
        return None
    return {
        "alias": single["autoencoder"],
        "family": single["family"],
        "fingerprint": single["fingerprint"],
        "scaling_factor": single["scaling_factor"],
        "shift_factor": single["shift_factor"],
        "downsample": single["downsample"],
    }


def _latents_entry(applied: bool, scan: OriginScan | None) -> dict[str, Any]:
    """The card's ``latents``: what a latent is and how to move it between raw and model space."""
    return {
        "what": "mean",
        "explanation": "the autoencoder's latent_dist.mean (deterministic); no sample, no std",
        "layout": "(C, h, w), C-contiguous",
        "space": "model" if applied else "raw",
        "scaling_applied": applied,
        "shift_applied": applied,
        "to_model_space": "already applied"
        if applied
        else "(latents - shift_factor) * scaling_factor",
        "to_raw": "latents / scaling_factor + shift_factor" if applied else "already raw",
        "storage_dtypes": dict(scan.storage_dtypes) if scan else None,
    }


def _columns_entry(
    label: str, options: Any, specs: list[ColumnSpec], pk_type: str
) -> list[dict[str, str]]:
    """The card's ``columns``: every sample's fields, the per-row origin (mixed), model columns."""
    columns = _sample_columns(label, options.dtype, options.model_space, pk_type)
    if options.allow_mixed:
        columns += _origin_columns(options.model_space)
    columns += [
        {
            "name": c.name,
            "type": c.type_name,
            "description": f"{label}.{c.name}",
        }
        for c in specs
    ]
    return columns


def _sample_columns(label: str, dtype: str, applied: bool, pk_type: str) -> list[dict[str, str]]:
    """The columns every export has (:data:`~latentstore.samples.SAMPLE_FIELDS`)."""
    return [
        {
            "name": "pk",
            "type": pk_type,
            "description": f"primary key of the {label} row",
        },
        {
            "name": "latents",
            "type": f"{dtype}[C, h, w]",
            "description": "model-space latents, (raw - shift_factor) * scaling_factor"
            if applied
            else "raw latents (latent_dist.mean): scaling and shift not applied",
        },
        {"name": "width", "type": "int32", "description": "original picture's width (px)"},
        {"name": "height", "type": "int32", "description": "original picture's height (px)"},
        {
            "name": "pad_right",
            "type": "int32",
            "description": "pixels of padding right of the picture before encoding",
        },
        {
            "name": "pad_bottom",
            "type": "int32",
            "description": "pixels of padding below the picture before encoding",
        },
        {
            "name": "crop",
            "type": "int32[4]",
            "description": "the picture's box (left, top, right, bottom) in the decoded "
            "(w*downsample, h*downsample) pixels",
        },
        {
            "name": "digest",
            "type": "string",
            "description": "content address of the stored blob (LatentImage.digest)",
        },
    ]


def _origin_columns(applied: bool) -> list[dict[str, str]]:
    """The per-row origin columns (:data:`~latentstore.samples.ORIGIN_FIELDS`) of a mixed export."""
    columns = [
        {"name": n, "type": "string", "description": "origin of this row's latents"}
        for n in ORIGIN_FIELDS[:3]
    ]
    columns += [
        {
            "name": n,
            "type": "float64",
            "description": "this row's factor" + (" (applied)" if applied else " (not applied)"),
        }
        for n in ORIGIN_FIELDS[3:]
    ]
    return columns


def read_snippets(out: Path, fmt: str, shards: int) -> dict[str, str]:
    """Three lines that read the export back, per format."""
    if fmt == "hf":
        return {
            "datasets": (
                "from datasets import load_dataset\n"
                f'ds = load_dataset("parquet", data_dir="{out}", split="train").with_format('
                '"numpy")\n'
                'latents = ds[0]["latents"]  # (C, h, w)'
            )
        }
    last = max(shards - 1, 0)
    pattern = f"{out}/{DATA_DIR}/train-{{00000..{last:05d}}}.tar"
    if shards <= 1:
        pattern = f"{out}/{DATA_DIR}/train-00000.tar"
    return {
        "webdataset": (
            "import webdataset as wds\n"
            f'ds = wds.WebDataset("{pattern}", shardshuffle=False).decode()\n'
            'sample = next(iter(ds))  # sample["npy"]: (C, h, w); sample["json"]: pk, width, ...'
        )
    }


def card_markdown(card: dict[str, Any]) -> str:
    """The ``README.md`` of an export: Hugging Face front matter and a human-readable card."""
    ext = EXTENSIONS[card["format"]]
    lines = _front_matter(card, ext) + _summary_table(card, ext)
    lines.append(_space_note(card["latents"]["scaling_applied"]))
    lines += ["", card["padding"], "", "## Columns", "", "| name | type | |", "|---|---|---|"]
    for column in card["columns"]:
        lines.append(f"| `{column['name']}` | {column['type']} | {column['description']} |")
    if card["origins"] and card["autoencoder"] is None:
        lines += _origins_section(card["origins"])
    lines += _reading_section(card)
    if card["skipped"]:
        lines += _skipped_section(card["skipped"])
    lines += [
        "Everything above is also in `latentstore.json` (machine-readable).",
        "",
    ]
    return "\n".join(lines)


def _front_matter(card: dict[str, Any], ext: str) -> list[str]:
    """The YAML header that tells Hugging Face where the shards are, then the title line."""
    return [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        f"    path: {DATA_DIR}/train-*.{ext}",
        "tags:",
        "- latentstore",
        "- latents",
        "---",
        "",
        f"# Latents of {card['source']['model']}.{card['source']['field']}",
        "",
        f"{card['count']} samples exported by latentstore {card['latentstore_version']} "
        f"on {card['created']}"
        + (f" with `{card['source']['command']}`" if card["source"]["command"] else "")
        + ".",
        "",
    ]


def _summary_table(card: dict[str, Any], ext: str) -> list[str]:
    """The table of the latent space, dtype, count and shards."""
    ae = card["autoencoder"]
    lat = card["latents"]
    applied = "applied" if lat["scaling_applied"] else "not applied"
    lines = ["| | |", "|---|---|"]
    if ae is not None:
        lines += [
            f"| autoencoder | `{ae['alias']}` (family `{ae['family']}`) |",
            f"| weights fingerprint | `{ae['fingerprint']}` |",
            f"| scaling factor | {ae['scaling_factor']:g} ({applied}) |",
            f"| shift factor | {ae['shift_factor']:g} ({applied}) |",
            f"| downsample | {ae['downsample']} px per latent cell |",
        ]
    else:
        lines.append(
            f"| autoencoders | {len(card['origins'])} origins, recorded per row "
            f"(`autoencoder`, `family`, `fingerprint`, `scaling_factor`, `shift_factor`); "
            f"scaling and shift {applied} |"
        )
    lines += [
        f"| latents | `latent_dist.mean` (not a sample, no std), {lat['space']} space, "
        f"{lat['layout']} |",
        f"| dtype | {card['dtype']} |",
        f"| count | {card['count']} |",
        f"| format | {card['format']}: {len(card['shards'])} "
        f"shard{'s' if len(card['shards']) != 1 else ''} `{DATA_DIR}/train-*.{ext}` |",
        "",
    ]
    return lines


def _space_note(applied: bool) -> str:
    """Which space the latents are in, and the formula to the other one."""
    if applied:
        return (
            "The latents are in **model space**, `(raw - shift_factor) * scaling_factor`, as "
            "diffusion trainers feed them. Raw latents: `latents / scaling_factor + "
            "shift_factor`."
        )
    return (
        "The latents are **raw** (`latent_dist.mean`, as stored). Trainers want model "
        "space: `(latents - shift_factor) * scaling_factor`."
    )


def _origins_section(origins: list[dict[str, Any]]) -> list[str]:
    """The rows per origin, for an export that mixes latent spaces."""
    lines = [
        "",
        "## Origins",
        "",
        "| autoencoder | family | fingerprint | rows |",
        "|---|---|---|---|",
    ]
    for origin in origins:
        lines.append(
            f"| `{origin['autoencoder']}` | `{origin['family']}` | `{origin['fingerprint']}` "
            f"| {origin['rows']} |"
        )
    return lines


def _reading_section(card: dict[str, Any]) -> list[str]:
    """The snippets that read the export back (and, for tar shards, what a sample holds)."""
    lines = ["", "## Reading it", ""]
    for reader, snippet in card["read"].items():
        lines += [f"With `{reader}`:", "", "```python", snippet, "```", ""]
    if card["format"] == "webdataset":
        lines += [
            "Each sample is `KEY.npy` (the latents, `numpy.save`, no pickle) and `KEY.json` "
            "(the other columns).",
            "",
        ]
    return lines


def _skipped_section(skipped: dict[str, str]) -> list[str]:
    """The unreadable rows left out (the first 20)."""
    lines = [
        "## Skipped rows",
        "",
        f"{len(skipped)} rows could not be read and are not in the shards:",
        "",
    ]
    lines += [f"- pk={pk}: {why}" for pk, why in list(skipped.items())[:20]]
    lines.append("")
    return lines
