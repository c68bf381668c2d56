"""Decoder backends that need torch: the latents' own VAE, TAESD and the consistency decoder.

Importing this module does not import torch (the web tier builds these backends for cache keys
and system checks); torch and the models load on the first decode, in the process that decodes.

What each backend feeds its model, from the raw latents we store (``latent_dist.mean``) and the
scaling/shift stamped into each blob (``model space = (raw - shift) * scaling``):

============================  ===================================================================
``VAEDecoder``                raw latents: ``AutoencoderKL.decode`` takes them as they came out
``TAESDDecoder``              model space: TAESD was distilled on the latents the diffusion
                              model sees, so SD's are multiplied by 0.18215, FLUX's shifted by
                              0.1159 and multiplied by 0.3611, and so on (as ComfyUI does, and
                              diffusers' pipelines with a TAESD as their VAE)
``ConsistencyDecoder``        raw latents: ``ConsistencyDecoderVAE.decode`` multiplies by its own
                              ``scaling_factor`` (0.18215), then normalises each channel
``OpenAIConsistencyDecoder``  raw latents: the package multiplies by 0.18215 itself
============================  ===================================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from latentstore import conf
from latentstore.decoders import (
    BaseDecoder,
    DecoderConfigError,
    IncompatibleLatents,
    weights_signature,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image as PILImage

    from latentstore.latents import LatentHeader

__all__ = [
    "ConsistencyDecoder",
    "OpenAIConsistencyDecoder",
    "TAESDDecoder",
    "VAEDecoder",
    "latent_seed",
    "seeded_global_rng",
]

#: The consistency decoder's hub id (diffusers format, safetensors weights).
CONSISTENCY_DECODER = "openai/consistency-decoder"
OPENAI_PACKAGE_INSTALL = "pip install git+https://github.com/openai/consistencydecoder.git"
# OpenAI's package multiplies raw latents by SD's scaling factor before normalising them.
_OPENAI_SCALING = 0.18215


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# (alias, what it was loaded from) -> weights fingerprint, for every autoencoder a VAEDecoder has
# loaded in this process: lets a refusal list VAE decoders without loading their models.
_seen_fingerprints: dict[tuple[str, str], str] = {}


def _weights_identity(cfg: dict[str, Any]) -> str:
    weights = weights_signature(str(cfg.get("PRETRAINED", "")))
    return _digest([weights, cfg.get("SUBFOLDER"), cfg.get("REVISION")])


class VAEDecoder(BaseDecoder):
    """``AutoencoderKL.decode`` of the latents' own autoencoder (or of ``autoencoder=`` alias).

    Reads every family (SD, SDXL, SD3, FLUX: 4- or 16-channel ``AutoencoderKL``), but only latents
    of its own weights: it refuses latents whose family or weights fingerprint differ from the
    loaded model's, because a VAE decodes faithfully only what its own encoder wrote.
    """

    needs_torch = True

    def __init__(self, alias: str, autoencoder: str | None = None, **options: Any) -> None:
        super().__init__(alias, **options)
        self.autoencoder = autoencoder

    def _alias_for(self, latent_autoencoder: str) -> str:
        return self.autoencoder or latent_autoencoder

    def readable_families(self) -> tuple[str, ...] | None:
        if self.autoencoder is None:
            return None  # each latent's own autoencoder, whatever its family
        cfg = conf.get_settings()["AUTOENCODERS"].get(self.autoencoder)
        return (str(cfg.get("FAMILY")),) if cfg else ()

    def fingerprint(self, autoencoder: str) -> str:
        alias = self._alias_for(autoencoder)
        try:
            cfg = conf.get_autoencoder_config(alias)
        except KeyError:
            cfg = {}
        return _digest(
            {
                "backend": "VAEDecoder",
                "alias": alias,
                "weights": weights_signature(str(cfg.get("PRETRAINED", ""))),
                "subfolder": cfg.get("SUBFOLDER"),
                "revision": cfg.get("REVISION"),
                "dtype": cfg.get("DTYPE"),
                "options": self.options,
            }
        )

    def can_read(self, header: LatentHeader) -> bool:
        autoencoders = conf.get_settings()["AUTOENCODERS"]
        alias = self._alias_for(header.autoencoder)
        cfg = autoencoders.get(alias)
        if cfg is None or cfg.get("FAMILY") != header.family:
            return False
        seen = _seen_fingerprints.get((alias, _weights_identity(cfg)))
        if seen is not None:
            return seen == header.fingerprint
        if alias == header.autoencoder:
            return True  # its own autoencoder, not loaded here yet: assume unchanged weights
        # Another alias reads these latents only if it loads the very same weights.
        origin = autoencoders.get(header.autoencoder)
        return origin is not None and _weights_identity(origin) == _weights_identity(cfg)

    def check(self, header: LatentHeader) -> None:
        from latentstore_workers.autoencoders import load_autoencoder

        alias = self._alias_for(header.autoencoder)
        try:
            ae = load_autoencoder(alias)
        except KeyError as exc:
            raise IncompatibleLatents(
                f"Decoder {self.alias!r} needs autoencoder {alias!r}, which is not configured "
                f"(these latents come from {header.autoencoder!r})."
            ) from exc
        cfg = conf.get_autoencoder_config(alias)
        _seen_fingerprints[(alias, _weights_identity(cfg))] = ae.fingerprint
        if ae.family != header.family or ae.fingerprint != header.fingerprint:
            raise self.incompatible(
                header,
                f"uses autoencoder {alias!r} (family {ae.family!r}, weights {ae.fingerprint})",
                hint="re-encode them with this autoencoder, or decode with one of those",
            )

    def decode(self, header: LatentHeader, latents: np.ndarray) -> PILImage.Image:
        from latentstore_workers.autoencoders import load_autoencoder
        from latentstore_workers.codec import decode_latents

        ae = load_autoencoder(self._alias_for(header.autoencoder))
        return decode_latents(ae, latents, header.width, header.height)

    def decode_batch(
        self, items: Sequence[tuple[LatentHeader, np.ndarray]]
    ) -> list[PILImage.Image | Exception]:
        """Decode in batches per autoencoder (``latentstore_workers.codec.decode_outcomes``)."""
        from latentstore_workers.autoencoders import load_autoencoder
        from latentstore_workers.codec import decode_outcomes

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
            for index, outcome in zip(indices, decode_outcomes(ae, batch), strict=True):
                results[index] = outcome.value if outcome.ok else outcome.error
        return results  # type: ignore[return-value]  # every index was filled


# --- helpers for the decoder-only models ---------------------------------------------------------


def latent_seed(latents: np.ndarray, salt: int = 0) -> int:
    """A 63-bit seed derived from the latents' content (and ``salt``), the same in every process.

    Equal latents give an equal seed, so a stochastic decoder draws the same noise for the same
    stored blob, whatever the global RNG state, the process or the machine.
    """
    import numpy as np

    arr = np.ascontiguousarray(latents, dtype="<f4")  # one byte order on every machine
    h = hashlib.blake2b(digest_size=8, person=b"latentseed")
    h.update(repr((tuple(arr.shape), int(salt))).encode())
    h.update(arr.tobytes())
    return int.from_bytes(h.digest(), "big") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global RNG seeded with ``seed``, restoring it afterwards.

    For code that draws from the global RNG and takes no generator (OpenAI's package). The
    global RNG is shared by every thread: callers hold a lock around the block.
    """
    import torch

    # torch.manual_seed would also reseed every CUDA device, which fork_rng restores only for
    # the devices it is given: seed exactly the generators it saves.
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


def _model_space(header: LatentHeader, latents: np.ndarray) -> torch.Tensor:
    """``(raw - shift) * scaling`` with the blob's own parameters, as a float32 (1, C, h, w)."""
    import numpy as np
    import torch

    arr = np.asarray(latents, dtype=np.float32)
    z = (arr - np.float32(header.shift_factor)) * np.float32(header.scaling_factor)
    tensor = torch.from_numpy(np.ascontiguousarray(z)).unsqueeze(0)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("latents contain NaN or infinity")
    return tensor


def _raw_for(header: LatentHeader, latents: np.ndarray, scaling: float) -> torch.Tensor:
    """Latents to hand a model that multiplies by ``scaling`` itself, as a float32 (1, C, h, w).

    They are the stored raw latents when the blob's parameters are the model's (SD latents:
    no shift, the same scaling), else whatever gives the blob's own model space once scaled.
    """
    import numpy as np
    import torch

    if header.shift_factor == 0 and math.isclose(header.scaling_factor, scaling, rel_tol=1e-6):
        tensor = torch.from_numpy(np.array(latents, dtype=np.float32, order="C", copy=True))
        tensor = tensor.unsqueeze(0)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError("latents contain NaN or infinity")
        return tensor
    return _model_space(header, latents) / scaling


def _to_picture(alias: str, sample: torch.Tensor, header: LatentHeader) -> PILImage.Image:
    import torch

    from latentstore_workers.codec import NonFiniteImage
    from latentstore_workers.images import to_pil

    if not bool(torch.isfinite(sample).all()):
        raise NonFiniteImage(
            f"Decoder {alias!r} decoded to NaN or infinity "
            "(float16 overflow is the usual cause; try dtype float32)"
        )
    return to_pil(sample[0], header.width, header.height)  # crops the encode-time padding


class _ModelDecoder(BaseDecoder):
    """A decoder with its own model, given by ``pretrained`` (hub id or local directory)."""

    needs_torch = True

    def __init__(
        self,
        alias: str,
        pretrained: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        autoencoder: str | None = None,
        RUN: str = "local",
        **unknown: Any,
    ) -> None:
        _refuse_unknown(alias, unknown)
        super().__init__(alias, RUN=RUN)
        _check_dtype(alias, dtype)
        self.pretrained = pretrained
        self.subfolder = subfolder
        self.revision = revision
        self.device = device
        self.dtype = dtype
        self.autoencoder = autoencoder  # only says which latents it is meant for (checks)

    def fingerprint(self, autoencoder: str) -> str:
        return _digest(
            {
                "backend": type(self).__module__ + "." + type(self).__qualname__,
                "weights": weights_signature(str(self.pretrained)),
                "subfolder": self.subfolder,
                "revision": self.revision,
                "dtype": self.dtype,
                "families": self.readable_families(),
            }
        )

    def _load(self, loader: Any) -> Any:
        """This decoder's model through ``loader`` (cached once per process by the loader)."""
        return loader(
            str(self.pretrained),
            subfolder=self.subfolder,
            revision=self.revision,
            device=self.device,
            dtype=self.dtype,
        )

    def _require_downsample(self, header: LatentHeader, factor: int) -> None:
        if factor != header.downsample:
            raise self.incompatible(
                header, f"decodes {factor}x latents (these are {header.downsample}x)"
            )

    def check(self, header: LatentHeader) -> None:
        super().check(header)
        self._require_channels(header)

    def _require_channels(self, header: LatentHeader) -> None:
        from latentstore.families import FAMILIES

        family = FAMILIES.get(header.family)
        if family is not None and header.shape[0] != family.channels:
            raise self.incompatible(
                header,
                f"reads {family.channels}-channel {family.name!r} latents (these have "
                f"{header.shape[0]} channels)",
            )


class TAESDDecoder(_ModelDecoder):
    """TAESD: diffusers ``AutoencoderTiny``, a ~1.2M-parameter distilled decoder, cheap on a CPU.

    Options: ``family`` (the latent family it reads), ``pretrained`` (hub id or local directory;
    ``madebyollin/taesd``, ``taesdxl``, ``taesd3`` or ``taef1``), ``autoencoder`` (the alias whose
    latents it is meant for), ``subfolder``, ``revision``, ``device`` (``auto``, ``cpu``,
    ``cuda[:N]``), ``dtype`` (``auto``: float16 on CUDA, else float32). Give at least one of
    ``family``, ``pretrained``, ``autoencoder``: the family comes from ``family``, else the
    autoencoder's ``FAMILY``, else the TAESD's name; the weights from ``pretrained``, else the
    family's TAESD on the hub. Reads every weights fingerprint of its family (TAESD was
    distilled on the family's latent space, not on one fine-tune's weights).
    """

    def __init__(
        self,
        alias: str,
        family: str | None = None,
        pretrained: str | None = None,
        autoencoder: str | None = None,
        **options: Any,
    ) -> None:
        from latentstore.families import FAMILIES, family_of_taesd

        named = family_of_taesd(pretrained) if pretrained else None
        configured = None
        if autoencoder is not None:
            cfg = conf.get_settings()["AUTOENCODERS"].get(autoencoder)
            if cfg is None:
                raise DecoderConfigError(
                    f"Decoder {alias!r} is configured for autoencoder {autoencoder!r}, which "
                    "does not exist.",
                    check_id="latentstore.E008",
                )
            configured = cfg.get("FAMILY")
        resolved = family or configured or named
        if resolved is None:
            raise DecoderConfigError(
                f"Decoder {alias!r} (TAESD) cannot tell which latent family it reads.",
                hint="Set OPTIONS 'family' (sd, sdxl, sd3, flux), 'autoencoder', or 'pretrained' "
                "to one of madebyollin/taesd, taesdxl, taesd3, taef1.",
                check_id="latentstore.E021",
            )
        if resolved not in FAMILIES:
            raise DecoderConfigError(
                f"Decoder {alias!r} (TAESD) reads unknown family {resolved!r}.",
                hint=f"Known families: {', '.join(FAMILIES)}.",
                check_id="latentstore.E021",
            )
        if named is not None and named != resolved:
            raise DecoderConfigError(
                f"Decoder {alias!r}: {pretrained!r} is the TAESD of {named!r} latents, but the "
                f"decoder is set to read {resolved!r} latents.",
                hint="Use the TAESD of the family, or correct 'family'.",
                check_id="latentstore.E021",
            )
        pretrained = pretrained or FAMILIES[resolved].taesd
        if pretrained is None:
            raise DecoderConfigError(
                f"Decoder {alias!r}: family {resolved!r} has no published TAESD.",
                hint="Set OPTIONS 'pretrained' to a TAESD trained for it.",
                check_id="latentstore.E021",
            )
        super().__init__(alias, pretrained=pretrained, autoencoder=autoencoder, **options)
        self.family = resolved

    def readable_families(self) -> tuple[str, ...]:
        return (self.family,)

    def can_read(self, header: LatentHeader) -> bool:
        from latentstore.families import FAMILIES

        return header.family == self.family and header.shape[0] == FAMILIES[self.family].channels

    def decode(self, header: LatentHeader, latents: np.ndarray) -> PILImage.Image:
        import torch

        from latentstore_workers.decoder_models import load_tiny_autoencoder

        loaded = self._load(load_tiny_autoencoder)
        cfg = loaded.model.config
        if int(cfg.latent_channels) != header.shape[0]:
            raise DecoderConfigError(
                f"Decoder {self.alias!r}: the TAESD at {self.pretrained!r} reads "
                f"{cfg.latent_channels}-channel latents, not {self.family!r} "
                f"({header.shape[0]} channels); is 'pretrained' the TAESD of this family?"
            )
        factor = int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
        self._require_downsample(header, factor)
        z = _model_space(header, latents)
        with torch.inference_mode():
            sample = loaded.model.decode(z.to(device=loaded.device, dtype=loaded.dtype)).sample
            return _to_picture(self.alias, sample, header)


class ConsistencyDecoder(_ModelDecoder):
    """OpenAI's consistency decoder through diffusers' ``ConsistencyDecoderVAE``; SD 1.x/2.x only.

    Reconstructs text and fine detail better than the SD VAE's own decoder, at about 15x its
    compute: a GPU decoder. It reads ``sd`` latents of any fine-tune of the SD VAE (they share
    the encoder). It is stochastic; its noise comes from a CPU generator seeded from the
    latents' content (:func:`latent_seed`), so the same blob always decodes to the same picture,
    in any process and on any device, and the picture can be cached. Only two inference steps
    work (diffusers' scheduler).

    Options: ``pretrained`` (default ``openai/consistency-decoder``, or a ``save_pretrained``
    directory), ``subfolder``, ``revision``, ``device``, ``dtype`` (``auto``: float16 on CUDA,
    else float32), ``seed`` (an integer mixed into every latent's seed: another deterministic
    sample), ``autoencoder`` (the alias it is meant for; checked to be of family ``sd``).
    """

    families = ("sd",)

    def __init__(
        self,
        alias: str,
        pretrained: str | None = CONSISTENCY_DECODER,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(alias, pretrained=pretrained or CONSISTENCY_DECODER, **options)
        self.seed = _check_seed(alias, seed)

    def fingerprint(self, autoencoder: str) -> str:
        return _digest([super().fingerprint(autoencoder), self.seed])

    def decode(self, header: LatentHeader, latents: np.ndarray) -> PILImage.Image:
        import torch

        from latentstore_workers.decoder_models import load_consistency_decoder

        loaded = self._load(load_consistency_decoder)
        model = loaded.model
        self._require_downsample(header, 2 ** (len(model.config.block_out_channels) - 1))
        # decode() multiplies by its own scaling_factor: hand it the raw latents that give the
        # blob's model space, (raw - shift) * scaling -- for SD, the raw latents themselves.
        z = _raw_for(header, latents, float(model.config.scaling_factor))
        generator = torch.Generator("cpu").manual_seed(latent_seed(latents, self.seed))
        with loaded.lock, torch.inference_mode():
            sample = model.decode(
                z.to(device=loaded.device, dtype=loaded.dtype),
                generator=generator,
                num_inference_steps=2,
            ).sample
            return _to_picture(self.alias, sample, header)


class OpenAIConsistencyDecoder(BaseDecoder):
    """The consistency decoder through OpenAI's own ``consistencydecoder`` package; opt-in.

    The package is not on PyPI (``pip install
    git+https://github.com/openai/consistencydecoder.git``) and loads a **TorchScript archive, a
    pickle-based format**, downloaded from OpenAI and checked against a sha256 pinned in its
    source. latentstore loads nothing with pickle, so this backend works only with
    ``OPTIONS["allow_torchscript"] = True``; prefer :class:`ConsistencyDecoder` (the same model
    in safetensors through diffusers).

    Options: ``allow_torchscript`` (required, ``True``), ``device``, ``dtype`` (of the latents
    handed to the package; ``auto``: float16 on CUDA, else float32), ``download_root`` (where
    the package keeps the checkpoint), ``schedule`` (the package's, default ``[1.0, 0.5]``),
    ``seed``, ``autoencoder``. SD 1.x/2.x latents only. The package draws its noise from
    torch's global RNG; each decode runs with that RNG seeded from the latents' content and
    restored afterwards, under a lock.
    """

    needs_torch = True

    families = ("sd",)

    def __init__(
        self,
        alias: str,
        allow_torchscript: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        download_root: str | None = None,
        schedule: Sequence[float] = (1.0, 0.5),
        seed: int = 0,
        autoencoder: str | None = None,
        RUN: str = "local",
        **unknown: Any,
    ) -> None:
        _refuse_unknown(alias, unknown)
        super().__init__(alias, RUN=RUN)
        _check_dtype(alias, dtype)
        if allow_torchscript is not True:
            raise DecoderConfigError(
                f"Decoder {alias!r} uses OpenAI's consistencydecoder package, which loads a "
                "TorchScript (pickle-based) checkpoint; latentstore loads nothing with pickle "
                "unless told to.",
                hint="Use latentstore_workers.decoders.ConsistencyDecoder (safetensors, through "
                "diffusers), or set OPTIONS 'allow_torchscript': True to accept OpenAI's "
                "checkpoint.",
                check_id="latentstore.E023",
            )
        if importlib.util.find_spec("consistencydecoder") is None:
            raise DecoderConfigError(
                f"Decoder {alias!r} needs OpenAI's consistencydecoder package, which is not "
                "installed (it is not on PyPI).",
                hint=f"{OPENAI_PACKAGE_INSTALL}, or use "
                "latentstore_workers.decoders.ConsistencyDecoder.",
                check_id="latentstore.E024",
            )
        self.device = device
        self.dtype = dtype
        self.download_root = download_root
        self.schedule = [float(s) for s in schedule]
        self.seed = _check_seed(alias, seed)
        self.autoencoder = autoencoder

    def fingerprint(self, autoencoder: str) -> str:
        return _digest(["OpenAIConsistencyDecoder", self.dtype, self.schedule, self.seed])

    def check(self, header: LatentHeader) -> None:
        super().check(header)
        if header.shape[0] != 4 or header.downsample != 8:
            raise self.incompatible(
                header, "reads 4-channel latents of an 8x SD VAE", hint=f"these are {header.shape}"
            )

    def decode(self, header: LatentHeader, latents: np.ndarray) -> PILImage.Image:
        import torch

        from latentstore_workers.decoder_models import load_openai_consistency_decoder

        loaded = load_openai_consistency_decoder(
            device=self.device, dtype=self.dtype, download_root=self.download_root
        )
        z = _raw_for(header, latents, _OPENAI_SCALING)
        seed = latent_seed(latents, self.seed)
        with loaded.lock, seeded_global_rng(seed, loaded.device), torch.inference_mode():
            sample = loaded.model(
                z.to(device=loaded.device, dtype=loaded.dtype), schedule=self.schedule
            )
            return _to_picture(self.alias, sample, header)


def _refuse_unknown(alias: str, unknown: dict[str, Any]) -> None:
    # A misspelt option ("Family", "devcie") would otherwise be ignored without a word.
    if unknown:
        raise DecoderConfigError(
            f"Decoder {alias!r} has unknown OPTIONS: {', '.join(sorted(unknown))}.",
            hint="See the backend's docstring for its options.",
            check_id="latentstore.E020",
        )


def _check_dtype(alias: str, dtype: Any) -> None:
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise DecoderConfigError(
            f"Decoder {alias!r} has dtype {dtype!r}.",
            hint="Use 'auto' (float16 on CUDA, else float32), 'float32', 'float16' or 'bfloat16'.",
            check_id="latentstore.E020",
        )


def _check_seed(alias: str, seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DecoderConfigError(
            f"Decoder {alias!r}: seed must be an integer, not {seed!r}.",
            check_id="latentstore.E020",
        )
    return seed
