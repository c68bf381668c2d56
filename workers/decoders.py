"""Decoder backends that need torch: the VAE decoder of the autoencoder that made the latents."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from latentstore import conf
from latentstore.decoders import BaseDecoder, IncompatibleLatents, weights_signature

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from latentstore.latents import LatentHeader


class VAEDecoder(BaseDecoder):
    """``AutoencoderKL.decode`` of the latents' own autoencoder (or of ``autoencoder=`` alias).

    It refuses latents whose family or weights fingerprint differ from the loaded model's: a
    VAE decodes only latents of its own weights faithfully.
    """

    def __init__(self, alias: str, autoencoder: str | None = None, **options: Any) -> None:
        super().__init__(alias, **options)
        self.autoencoder = autoencoder

    def _alias_for(self, latent_autoencoder: str) -> str:
        return self.autoencoder or latent_autoencoder

    def fingerprint(self, autoencoder: str) -> str:
        alias = self._alias_for(autoencoder)
        try:
            cfg = conf.get_autoencoder_config(alias)
        except KeyError:
            cfg = {}
        payload = json.dumps(
            {
                "backend": "VAEDecoder",
                "alias": alias,
                "weights": weights_signature(str(cfg.get("PRETRAINED", ""))),
                "subfolder": cfg.get("SUBFOLDER"),
                "revision": cfg.get("REVISION"),
                "dtype": cfg.get("DTYPE"),
                "options": self.options,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()

    def check(self, header: LatentHeader) -> None:
        from workers.autoencoders import load_autoencoder

        alias = self._alias_for(header.autoencoder)
        try:
            ae = load_autoencoder(alias)
        except KeyError as exc:
            raise IncompatibleLatents(
                f"Decoder {self.alias!r} needs autoencoder {alias!r}, which is not configured "
                f"(these latents come from {header.autoencoder!r})."
            ) from exc
        if ae.family != header.family or ae.fingerprint != header.fingerprint:
            raise IncompatibleLatents(
                f"Decoder {self.alias!r} uses autoencoder {alias!r} "
                f"(family {ae.family!r}, weights {ae.fingerprint}) but these latents are "
                f"family {header.family!r}, weights {header.fingerprint} from "
                f"{header.autoencoder!r}; re-encode them or decode with 'rgb'."
            )

    def decode(self, header: LatentHeader, latents: np.ndarray) -> PILImage.Image:
        from workers.autoencoders import load_autoencoder
        from workers.codec import decode_latents

        ae = load_autoencoder(self._alias_for(header.autoencoder))
        return decode_latents(ae, latents, header.width, header.height)

    def decode_many(
        self, items: Sequence[tuple[LatentHeader, np.ndarray]]
    ) -> list[PILImage.Image | Exception]:
        """Decode in batches per autoencoder (``workers.codec.decode_many``)."""
        from workers.autoencoders import load_autoencoder
        from workers.codec import decode_many

        results: list[PILImage.Image | Exception | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for index, (header, _latents) in enumerate(items):
            groups.setdefault(self._alias_for(header.autoencoder), []).append(index)
        for alias, indices in groups.items():
            try:
                ae = load_autoencoder(alias)
            except Exception as exc:
                for index in indices:
                    results[index] = exc
                continue
            batch = [(items[i][1], items[i][0].width, items[i][0].height) for i in indices]
            for index, outcome in zip(indices, decode_many(ae, batch), strict=True):
                results[index] = outcome.value if outcome.ok else outcome.error
        return results  # type: ignore[return-value]  # every index was filled
