"""Round-trip quality: PSNR, the per-field gate settings, and finding low-fidelity rows.

Numpy only (no torch, no Django models imported at module level): the worker measures with
:func:`psnr` right after encoding (``latentstore_workers.quality``), and the web tier reads the
stored number through ``LatentImage.psnr`` / ``LatentImage.low_fidelity`` or filters rows with
``latentstore.queries.low_fidelity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from django.core import checks

from latentstore import conf
from latentstore.latents import is_number

if TYPE_CHECKING:
    from django.db import models

    from latentstore.fields import LatentImageField

__all__ = [
    "MAX_PSNR",
    "KEEP_LOW_FIDELITY",
    "QualityPolicy",
    "low_fidelity_q",
    "field_option_errors",
    "option_problems",
    "psnr",
]

#: PSNR reported for identical pictures (and the cap of any measurement): a finite number that
#: every database column holds, far above what any lossy round trip reaches.
MAX_PSNR = 100.0

#: ``keep_original`` value that keeps the original only for rows below the PSNR threshold.
KEEP_LOW_FIDELITY = "low_fidelity"


def psnr(reference: Any, test: Any) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit pictures of the same size.

    Takes PIL images or uint8 arrays (``H x W`` or ``H x W x C``); the mean squared error is
    taken over every pixel and channel, as is usual for RGB. Identical inputs give
    :data:`MAX_PSNR`. Raises ``ValueError`` for shapes that differ.
    """
    a = np.asarray(reference)
    b = np.asarray(test)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare pictures of shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("cannot compare empty pictures")
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return MAX_PSNR
    return min(MAX_PSNR, 10.0 * math.log10(255.0**2 / mse))


def option_problems(
    keep_original: Any, quality_check: Any, min_psnr: Any, *, unset_allowed: bool
) -> dict[str, str]:
    """What is wrong with the three quality options, by option name, for a system check.

    Keys name the invalid ones (``"keep_original"``, ``"quality_check"``, ``"min_psnr"``, in
    that order); values end a sentence about the value (``"is not True or False"``), so a
    field's options and the settings can each word and number their errors. With
    ``unset_allowed`` (a field's options) None means "use the setting", not a bad value.
    """
    unset = (None,) if unset_allowed else ()
    problems = {}
    if keep_original not in (*unset, True, False, KEEP_LOW_FIDELITY):
        problems["keep_original"] = f"is not True, False or {KEEP_LOW_FIDELITY!r}"
    if quality_check not in (*unset, True, False):
        problems["quality_check"] = "is not True or False"
    if not (unset_allowed and min_psnr is None) and not is_number(min_psnr):
        problems["min_psnr"] = "is not a number of decibels"
    return problems


@dataclass(frozen=True)
class QualityPolicy:
    """What the encode-time gate does for one field (the field's options over the settings).

    ``check``: decode right after encoding and store the round-trip PSNR; ``min_psnr``: rows
    below it are low-fidelity; ``keep_original``: ``True`` (always), ``False`` (never) or
    ``"low_fidelity"`` (only rows below ``min_psnr``, which implies ``check``).
    """

    check: bool
    min_psnr: float
    keep_original: bool | str

    @classmethod
    def for_field(cls, field: LatentImageField) -> QualityPolicy:
        """The effective policy of ``field``: its own options, else ``LATENTSTORE`` settings."""
        settings = conf.get_settings()
        keep = field.keep_original if field.keep_original is not None else settings["KEEP_ORIGINAL"]
        check = (
            field.quality_check if field.quality_check is not None else settings["QUALITY_CHECK"]
        )
        min_psnr = field.min_psnr if field.min_psnr is not None else settings["MIN_PSNR"]
        if keep == KEEP_LOW_FIDELITY:
            check = True  # keeping the low-fidelity ones needs the measurement
        else:
            keep = bool(keep)
        return cls(check=bool(check), min_psnr=float(min_psnr), keep_original=keep)

    def is_low_fidelity(self, value: float | None) -> bool:
        """Whether a measured PSNR is below this policy's threshold (None: not measured)."""
        return value is not None and value < self.min_psnr

    def keeps_original(self, value: float | None) -> bool:
        """Whether a row with this measured PSNR keeps its original after encoding.

        With ``"low_fidelity"``, a row the gate could not measure (``None`` while the gate is
        on) keeps it too: nothing shows that its latents are faithful.
        """
        if self.keep_original == KEEP_LOW_FIDELITY:
            return value is None or self.is_low_fidelity(value)
        return bool(self.keep_original)


def low_fidelity_q(field: LatentImageField, min_psnr: float | None = None) -> models.Q:
    """The condition "measured below the threshold" on ``field``'s rows, for ``filter()``,
    ``exclude()`` or an aggregate's ``filter=``.

    ``min_psnr`` overrides the field's threshold (``min_psnr`` option, else ``MIN_PSNR``). Rows
    never measured (NULL) do not match.
    """
    from django.db.models import Q

    threshold = QualityPolicy.for_field(field).min_psnr if min_psnr is None else min_psnr
    return Q(**{f"{field.companion_attname('psnr')}__lt": threshold})


def field_option_errors(field: LatentImageField) -> list[checks.CheckMessage]:
    """System-check errors for a field's ``keep_original``, ``quality_check`` and ``min_psnr``."""
    ids = {
        "keep_original": "latentstore.E030",
        "quality_check": "latentstore.E031",
        "min_psnr": "latentstore.E033",
    }
    problems = option_problems(
        field.keep_original, field.quality_check, field.min_psnr, unset_allowed=True
    )
    errors = [
        checks.Error(f"{name}={getattr(field, name)!r} {why}.", obj=field, id=ids[name])
        for name, why in problems.items()
    ]
    # A field-only conflict: the settings' KEEP_ORIGINAL="low_fidelity" just turns the
    # check on. Both options are valid here, so only E033 can precede it: put it first.
    if field.quality_check is False and field.keep_original == KEEP_LOW_FIDELITY:
        errors.insert(
            0,
            checks.Error(
                "keep_original='low_fidelity' needs the round-trip measurement, but "
                "quality_check=False turns it off.",
                obj=field,
                hint="Drop quality_check=False (keep_original='low_fidelity' turns it on).",
                id="latentstore.E032",
            ),
        )
    return errors
