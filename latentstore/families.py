"""Latent model families: channel count, default scaling/shift, and the latent->RGB projection.

A *family* is the latent space an autoencoder writes into. Latents of one family can be read by
any decoder of that family, and previewed with the same linear projection. Numpy-free and
Django-free on purpose: the web tier, the workers and the codec all import it.

Model-space latents are ``(raw - shift_factor) * scaling_factor`` where ``raw`` is the
autoencoder's ``latent_dist.mean``; the RGB factors act on model-space latents, so a preview is
``rgb = model_space @ rgb_factors + rgb_bias``, giving values roughly in [-1, 1].

The projection coefficients are ComfyUI's hand-fitted ``latent_rgb_factors`` and
``latent_rgb_factors_bias`` (GPL-3.0, numbers only), copied from
https://github.com/comfyanonymous/ComfyUI/blob/040a3243468ecefd1f2802592d90458f1ce4d65f/comfy/latent_formats.py
(classes ``SD15``, ``SDXL``, ``SD3`` and ``Flux``). ComfyUI applies them in ``latent_preview.py``
to the sampler's ``x0``, which is already in model space (``LatentFormat.process_in``), and maps
``[-1, 1]`` to ``[0, 255]`` -- the same convention as :mod:`latentstore.preview`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["FAMILIES", "Family", "UnknownFamily", "family_of_taesd", "get_family"]

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Family:
    """One latent space: what its latents look like and how to preview them without a model."""

    name: str
    channels: int
    scaling_factor: float
    shift_factor: float
    rgb_factors: tuple[RGB, ...]  # channels x 3, applied to model-space latents
    rgb_bias: RGB
    #: Hub id of the TAESD (``AutoencoderTiny``) distilled for this latent space, if any.
    taesd: str | None = None

    def __post_init__(self) -> None:
        # A wrong-sized table would only show up as a numpy broadcast error deep in a preview.
        if len(self.rgb_factors) != self.channels:
            raise ValueError(
                f"family {self.name!r}: {len(self.rgb_factors)} rows of rgb_factors "
                f"for {self.channels} channels"
            )
        if any(len(row) != 3 for row in self.rgb_factors) or len(self.rgb_bias) != 3:
            raise ValueError(f"family {self.name!r}: rgb_factors rows and rgb_bias need 3 values")


class UnknownFamily(ValueError):
    """Raised by :func:`get_family` for a name that is not in :data:`FAMILIES`."""


# SD 1.x and 2.x share one VAE (and sd-vae-ft-mse/-ema are fine-tunes of it). ComfyUI: SD15,
# which has no bias.
_SD = Family(
    name="sd",
    channels=4,
    scaling_factor=0.18215,
    shift_factor=0.0,
    rgb_factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
    rgb_bias=(0.0, 0.0, 0.0),
    taesd="madebyollin/taesd",
)

# ComfyUI: SDXL.
_SDXL = Family(
    name="sdxl",
    channels=4,
    scaling_factor=0.13025,
    shift_factor=0.0,
    rgb_factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    rgb_bias=(0.1084, -0.0175, -0.0011),
    taesd="madebyollin/taesdxl",
)

# ComfyUI: SD3 (16-channel VAE with a shift).
_SD3 = Family(
    name="sd3",
    channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    rgb_factors=(
        (-0.0922, -0.0175, 0.0749),
        (0.0311, 0.0633, 0.0954),
        (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496),
        (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427),
        (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268),
        (0.0922, 0.0988, 0.0951),
        (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895),
        (-0.0069, -0.0030, -0.0810),
        (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    rgb_bias=(0.2394, 0.2135, 0.1925),
    taesd="madebyollin/taesd3",
)

# ComfyUI: Flux (FLUX.1 VAE; 16 channels, different latent space from SD3's).
_FLUX = Family(
    name="flux",
    channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    rgb_factors=(
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
    taesd="madebyollin/taef1",
)

# latentstore's own small AutoencoderKL (workers/pretrained/ls-small), a latent space of its own.
# Scaling/shift are 1/std and mean of its raw latents, and the projection is least squares from
# its model-space latents to each 8x8 cell's mean colour, all fitted on its training pictures by
# workers/training/train.py (numbers from the model card, workers/pretrained/ls-small/README.md).
_LS_SMALL = Family(
    name="ls-small",
    channels=4,
    scaling_factor=0.35826,
    shift_factor=-0.07586,
    rgb_factors=(
        (-0.4174, -0.5207, -0.7672),
        (0.2564, 0.8296, 0.8844),
        (0.6118, 0.7038, 0.643),
        (0.3226, 0.4069, 0.3073),
    ),
    rgb_bias=(0.0988, -0.0708, -0.1493),
)

# Adding a family: define one more ``Family`` above (its channel count, the scaling/shift its
# autoencoder's config declares, the RGB projection, its TAESD if there is one) and list it here;
# every decoder, the preview and the system checks pick it up from this table.
_ALL = (_SD, _SDXL, _SD3, _FLUX, _LS_SMALL)

# Read-only: a module-level registry that tests or apps could mutate would leak between them.
FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in _ALL})


def get_family(name: str) -> Family:
    """Return the family called ``name``; raise :class:`UnknownFamily` naming the known ones."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise UnknownFamily(
            f"unknown latent family {name!r}; known families: {', '.join(sorted(FAMILIES))}"
        ) from None


def family_of_taesd(pretrained: str) -> str | None:
    """The family whose TAESD ``pretrained`` names, or None when the name does not say.

    ``pretrained`` is a hub id (``madebyollin/taesdxl``) or a local directory whose last path
    component is such a name (``/models/taesdxl``).
    """
    name = str(pretrained).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    for family in FAMILIES.values():
        if family.taesd and family.taesd.rsplit("/", 1)[-1].lower() == name:
            return family.name
    return None
