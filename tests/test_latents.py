"""The latent blob codec: round trips, header, digest, and every way a blob can be broken."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from latentstore.latents import (
    FORMAT_VERSION,
    MAGIC,
    STORAGE_DTYPES,
    LatentFormatError,
    LatentHeader,
    blob_digest,
    pack,
    read_header,
    unpack,
)

ORIGIN = {
    "autoencoder": "default",
    "family": "sd",
    "fingerprint": "0123456789abcdef",
    "scaling_factor": 0.18215,
    "shift_factor": 0.0,
}


def kwargs(shape, downsample=8, **overrides):
    """pack() keyword arguments for latents of ``shape`` covering a full (unpadded) grid."""
    _, h, w = shape
    kw = {**ORIGIN, "width": w * downsample, "height": h * downsample, "downsample": downsample}
    kw.update(overrides)
    return kw


def sd_latents(shape=(4, 8, 8), seed=0):
    # Raw SD-VAE latents have a per-channel std around 5.
    return np.random.default_rng(seed).normal(0.0, 5.0, shape).astype(np.float32)


def header_len(blob):
    return struct.unpack_from("<I", blob, 6)[0]


def forge(header: dict, payload: bytes, *, version=FORMAT_VERSION) -> bytes:
    """A blob with a *valid* checksum around arbitrary header/payload: tests the checks that
    a checksum cannot make (what a buggy or hostile writer could produce)."""
    head = json.dumps(header).encode()
    body = MAGIC + struct.pack("<HI", version, len(head)) + head + payload
    return body + hashlib.blake2b(body, digest_size=16).digest()


def split(blob):
    """(header dict, payload bytes) of a valid blob."""
    n = header_len(blob)
    return json.loads(blob[10 : 10 + n]), blob[10 + n : -16]


# ---------------------------------------------------------------------------------------------
# round trips


def test_float16_round_trip_is_exactly_numpy_float16():
    x = sd_latents((4, 64, 64))
    header, y = unpack(pack(x, **kwargs(x.shape)))
    assert y.dtype == np.float32
    assert y.shape == (4, 64, 64)
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    assert header.dtype == "float16"


def test_float16_payload_size_and_layout():
    x = sd_latents((4, 64, 64))
    blob = pack(x, **kwargs(x.shape))
    _, payload = split(blob)
    assert len(payload) == 4 * 64 * 64 * 2
    # C-contiguous little-endian float16, readable by anyone with the layout.
    np.testing.assert_array_equal(
        np.frombuffer(payload, dtype="<f2").reshape(4, 64, 64), x.astype(np.float16)
    )


def test_float64_and_float16_inputs_are_accepted():
    x = sd_latents((4, 8, 8))
    for arr in (x.astype(np.float64), x.astype(np.float16)):
        _, y = unpack(pack(arr, **kwargs(arr.shape)))
        np.testing.assert_array_equal(y, arr.astype(np.float16).astype(np.float32))


def test_non_contiguous_input():
    x = sd_latents((4, 16, 16))
    view = x[:, ::2, ::-2]
    _, y = unpack(pack(view, **kwargs(view.shape)))
    np.testing.assert_array_equal(y, view.astype(np.float16).astype(np.float32))


def test_int8_round_trip_within_half_a_step():
    x = sd_latents((4, 64, 64))
    blob = pack(x, dtype="int8", **kwargs(x.shape))
    header, y = unpack(blob)
    assert header.dtype == "int8"
    assert y.dtype == np.float32 and y.shape == x.shape
    step = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))) / 255.0
    err = np.abs(y - x).max(axis=(1, 2))
    assert np.all(err <= step / 2 * (1 + 1e-3) + 1e-6), (err, step / 2)
    # It really is quantised (not secretly float16): the error is of the order of a step.
    assert np.all(err > step / 10)
    # Extremes survive exactly (they are the affine end points).
    np.testing.assert_allclose(y.max(axis=(1, 2)), x.max(axis=(1, 2)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(y.min(axis=(1, 2)), x.min(axis=(1, 2)), rtol=0, atol=1e-6)


def test_int8_halves_the_payload_and_uses_the_full_range():
    x = sd_latents((4, 64, 64))
    head, payload = split(pack(x, dtype="int8", **kwargs(x.shape)))
    assert len(payload) == 4 * 64 * 64
    q = np.frombuffer(payload, dtype=np.int8).reshape(4, -1)
    assert (q.min(axis=1) == -128).all() and (q.max(axis=1) == 127).all()
    assert len(head["quant"]["scale"]) == len(head["quant"]["offset"]) == 4


@pytest.mark.parametrize("dtype, value", [("int8", 2.75), ("int4", -7.5)])
def test_quantised_constant_channel_is_exact(dtype, value):
    x = sd_latents((3, 4, 5))
    x[1] = value  # hi == lo: no division by zero, exact read-back
    x[2] = 0.0
    _, y = unpack(pack(x, dtype=dtype, **kwargs(x.shape)))
    assert (y[1] == value).all() and (y[2] == 0.0).all()
    assert np.isfinite(y).all()


def test_int4_round_trip_within_half_a_step():
    x = sd_latents((4, 64, 64))
    header, y = unpack(pack(x, dtype="int4", **kwargs(x.shape)))
    assert header.dtype == "int4"
    assert y.dtype == np.float32 and y.shape == x.shape
    step = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))) / 15.0
    err = np.abs(y - x).max(axis=(1, 2))
    assert np.all(err <= step / 2 * (1 + 1e-3) + 1e-6), (err, step / 2)
    assert np.all(err > step / 4)  # really 16 levels, not a finer grid
    # 16 distinct values per channel at most, and the extremes are the end points.
    assert all(len(np.unique(y[c])) <= 16 for c in range(4))
    np.testing.assert_allclose(y.max(axis=(1, 2)), x.max(axis=(1, 2)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(y.min(axis=(1, 2)), x.min(axis=(1, 2)), rtol=0, atol=1e-6)


def test_int4_packs_two_values_a_byte_low_nibble_first():
    x = sd_latents((4, 64, 64))
    head, payload = split(pack(x, dtype="int4", **kwargs(x.shape)))
    assert len(payload) == 4 * 64 * 64 // 2  # a quarter of float16's
    raw = np.frombuffer(payload, dtype=np.uint8)
    q = np.empty(2 * len(raw), np.uint8)
    q[0::2], q[1::2] = raw & 0x0F, raw >> 4
    q = q.reshape(4, -1)
    assert (q.min(axis=1) == 0).all() and (q.max(axis=1) == 15).all()
    # The nibbles read back through the header's affine map are what unpack returns.
    offset, scale = (np.array(head["quant"][k], np.float32) for k in ("offset", "scale"))
    expected = q.astype(np.float32) * scale[:, None] + offset[:, None]
    _, y = unpack(pack(x, dtype="int4", **kwargs(x.shape)))
    np.testing.assert_array_equal(y.reshape(4, -1), expected)


def test_int4_odd_count_pads_a_zero_nibble_and_checks_it():
    x = sd_latents((1, 3, 5))  # 15 values: 8 bytes, the last high nibble is padding
    blob = pack(x, dtype="int4", **kwargs(x.shape))
    head, payload = split(blob)
    assert len(payload) == 8 and payload[-1] >> 4 == 0
    assert unpack(blob)[1].shape == (1, 3, 5)
    bad = bytearray(payload)
    bad[-1] |= 0x30
    with pytest.raises(LatentFormatError, match="padding nibble"):
        unpack(forge(head, bytes(bad)))
    with pytest.raises(LatentFormatError, match="truncated"):
        unpack(forge(head, payload[:-1]))


def test_int4_quant_must_be_well_formed():
    x = sd_latents((2, 2, 2))
    head, payload = split(pack(x, dtype="int4", **kwargs(x.shape)))
    for quant in (None, {"scale": [1.0, 1.0]}, {"offset": [0, 0], "scale": [1.0, -1.0]}):
        bad = dict(head, quant=quant)
        with pytest.raises(LatentFormatError, match="quant"):
            unpack(forge(bad, payload))
    head["quant"]["scale"] = [1e308, 1.0]
    with pytest.raises(LatentFormatError, match="finite"):
        unpack(forge(head, payload))


def test_float16_header_with_quant_is_refused():
    x = sd_latents((2, 2, 2))
    head, payload = split(pack(x, **kwargs(x.shape)))
    head["quant"] = {"offset": [0.0, 0.0], "scale": [1.0, 1.0]}
    with pytest.raises(LatentFormatError, match="only valid for int8 and int4"):
        unpack(forge(head, payload))


def test_int8_bytes_are_unchanged_by_the_int4_generalisation():
    # Digests are content addresses: the int8 payload must stay byte-for-byte what it was.
    x = sd_latents((4, 8, 8))
    _, payload = split(pack(x, dtype="int8", **kwargs(x.shape)))
    lo, hi = x.min(axis=(1, 2)), x.max(axis=(1, 2))
    inv = (1.0 / ((hi.astype(np.float64) - lo) / 255.0)).astype(np.float32)
    expected = np.clip(np.rint((x - lo[:, None, None]) * inv[:, None, None]) - 128, -128, 127)
    np.testing.assert_array_equal(np.frombuffer(payload, np.int8), expected.astype(np.int8).ravel())


def test_unpacked_array_is_writable_and_independent():
    x = sd_latents()
    blob = bytearray(pack(x, **kwargs(x.shape)))
    _, y = unpack(blob)
    y[0, 0, 0] = 123.0  # must not raise (not a read-only view of the blob)
    blob[-20] ^= 0xFF  # and must not be a view either
    assert y[0, 0, 1] == np.float16(x[0, 0, 1])


# ---------------------------------------------------------------------------------------------
# header


def test_header_fields_preserved():
    x = sd_latents((4, 47, 63))  # a 500x375 photo at 8 px a cell: 63x47 grid, padded 4 and 1
    blob = pack(
        x,
        autoencoder="sdxl-fp16",
        family="sdxl",
        fingerprint="deadbeefcafef00d",
        scaling_factor=0.13025,
        shift_factor=0.0,
        width=500,
        height=375,
        dtype="int8",
    )
    expected = LatentHeader(
        version=FORMAT_VERSION,
        autoencoder="sdxl-fp16",
        family="sdxl",
        fingerprint="deadbeefcafef00d",
        scaling_factor=0.13025,
        shift_factor=0.0,
        shape=(4, 47, 63),
        dtype="int8",
        width=500,
        height=375,
        downsample=8,
        pad_right=4,
        pad_bottom=1,
    )
    assert unpack(blob)[0] == expected
    assert read_header(blob) == expected
    assert expected.origin == {
        "autoencoder": "sdxl-fp16",
        "family": "sdxl",
        "fingerprint": "deadbeefcafef00d",
    }
    assert isinstance(read_header(blob).shape, tuple)


def test_header_is_json_with_every_field():
    x = sd_latents((16, 4, 4))
    blob = pack(x, **kwargs(x.shape, family="sd3", scaling_factor=1.5305, shift_factor=0.0609))
    head, _ = split(blob)
    assert set(head) == {
        "version",
        "autoencoder",
        "family",
        "fingerprint",
        "scaling_factor",
        "shift_factor",
        "shape",
        "dtype",
        "width",
        "height",
        "downsample",
        "pad_right",
        "pad_bottom",
    }
    assert head["shift_factor"] == 0.0609 and head["shape"] == [16, 4, 4]
    assert blob[:4] == b"LTNT" and struct.unpack_from("<H", blob, 4)[0] == 1


def test_unicode_names_survive():
    x = sd_latents()
    blob = pack(x, **kwargs(x.shape, autoencoder="vae-ü-東京", fingerprint=""))
    assert read_header(blob).autoencoder == "vae-ü-東京"
    assert read_header(blob).fingerprint == ""


def test_read_header_needs_no_payload():
    x = sd_latents((4, 64, 64))
    blob = pack(x, **kwargs(x.shape))
    head_only = blob[: 10 + header_len(blob)]
    assert read_header(head_only) == unpack(blob)[0]
    assert read_header(memoryview(head_only)).shape == (4, 64, 64)
    with pytest.raises(LatentFormatError, match="truncated"):
        unpack(head_only)


def test_read_header_does_not_verify_the_payload():
    x = sd_latents()
    blob = bytearray(pack(x, **kwargs(x.shape)))
    blob[-20] ^= 0x01
    assert read_header(blob).shape == x.shape  # cheap path: header only
    with pytest.raises(LatentFormatError, match="checksum"):
        unpack(blob)


# ---------------------------------------------------------------------------------------------
# digest


def test_digest_is_the_stored_checksum_and_stable():
    x = sd_latents()
    blob = pack(x, **kwargs(x.shape))
    again = pack(x.copy(), **kwargs(x.shape))
    assert blob == again  # deterministic bytes
    digest = blob_digest(blob)
    assert digest == blob_digest(again) == blob_digest(memoryview(blob))
    assert digest == blob[-16:].hex() == hashlib.blake2b(blob[:-16], digest_size=16).hexdigest()
    assert len(digest) == 32 and int(digest, 16) >= 0


def test_digest_changes_with_content_and_origin():
    x = sd_latents()
    base = blob_digest(pack(x, **kwargs(x.shape)))
    y = x.copy()
    y[3, 2, 1] += 1.0
    digests = {
        base,
        blob_digest(pack(y, **kwargs(x.shape))),
        blob_digest(pack(x, **kwargs(x.shape, fingerprint="ffff"))),
        blob_digest(pack(x, **kwargs(x.shape, autoencoder="other"))),
        blob_digest(pack(x, **kwargs(x.shape, scaling_factor=0.2))),
        blob_digest(pack(x, dtype="int8", **kwargs(x.shape))),
        blob_digest(pack(x, **kwargs(x.shape, width=x.shape[2] * 8 - 1))),
    }
    assert len(digests) == 7


def test_digest_does_not_rehash():
    # A corrupted payload keeps the stored address: blob_digest only reads the last 16 bytes.
    x = sd_latents()
    blob = bytearray(pack(x, **kwargs(x.shape)))
    digest = blob_digest(blob)
    blob[40] ^= 0xFF
    assert blob_digest(blob) == digest


@pytest.mark.parametrize("bad", [b"", b"LT", b"LTNT\x01\x00", b"XXXX" + bytes(40)])
def test_digest_of_garbage_raises(bad):
    with pytest.raises(LatentFormatError):
        blob_digest(bad)


# ---------------------------------------------------------------------------------------------
# broken blobs


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_every_truncation_raises(dtype):
    x = sd_latents((4, 3, 5))
    blob = pack(x, dtype=dtype, **kwargs(x.shape))
    for n in range(len(blob)):
        with pytest.raises(LatentFormatError):
            unpack(blob[:n])
    assert unpack(blob)[1].shape == x.shape


def test_truncation_message_says_expected_and_actual_size():
    x = sd_latents((4, 64, 64))
    blob = pack(x, **kwargs(x.shape))
    with pytest.raises(LatentFormatError) as info:
        unpack(blob[:1000])
    assert str(info.value) == (f"latent blob is truncated: expected {len(blob)} bytes, got 1000")
    with pytest.raises(LatentFormatError, match="empty"):
        unpack(b"")


def test_trailing_bytes_raise():
    x = sd_latents()
    blob = pack(x, **kwargs(x.shape))
    with pytest.raises(LatentFormatError, match="trailing"):
        unpack(blob + b"\x00")


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipped_byte_anywhere_raises(dtype, mask):
    x = sd_latents((4, 3, 5))
    blob = pack(x, dtype=dtype, **kwargs(x.shape))
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= mask
        with pytest.raises(LatentFormatError):
            unpack(bad)


def test_wrong_magic():
    x = sd_latents()
    blob = pack(x, **kwargs(x.shape))
    with pytest.raises(LatentFormatError, match="magic"):
        unpack(b"PNG\x00" + blob[4:])
    with pytest.raises(LatentFormatError, match="magic"):
        read_header(b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_unknown_version_is_named_even_with_a_valid_checksum():
    x = sd_latents()
    head, payload = split(pack(x, **kwargs(x.shape)))
    with pytest.raises(LatentFormatError, match="unsupported latent format version 2"):
        unpack(forge(head, payload, version=2))
    with pytest.raises(LatentFormatError, match="version 0"):
        read_header(forge(head, payload, version=0))


def test_header_version_must_match_prefix():
    x = sd_latents()
    head, payload = split(pack(x, **kwargs(x.shape)))
    head["version"] = 2
    with pytest.raises(LatentFormatError, match="version"):
        unpack(forge(head, payload))


def test_huge_header_length_is_refused_early():
    blob = MAGIC + struct.pack("<HI", FORMAT_VERSION, 0xFFFFFFFF) + bytes(64)
    with pytest.raises(LatentFormatError, match="header length"):
        unpack(blob)


def test_non_finite_payload_is_refused():
    x = sd_latents((1, 2, 2))
    head, payload = split(pack(x, **kwargs(x.shape)))
    for bits in (0x7C00, 0xFC00, 0x7E00, 0x7C01):  # +inf, -inf, NaN, signalling NaN
        bad = bytearray(payload)
        bad[2:4] = struct.pack("<H", bits)
        with pytest.raises(LatentFormatError, match="NaN or infinite"):
            unpack(forge(head, bytes(bad)))


def test_int8_scale_that_overflows_float32_is_refused():
    x = sd_latents((2, 2, 2))
    head, payload = split(pack(x, dtype="int8", **kwargs(x.shape)))
    head["quant"]["scale"] = [1e308, 1.0]
    with pytest.raises(LatentFormatError, match="finite"):
        unpack(forge(head, payload))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.pop("family"), "missing family"),
        (lambda h: h.update(extra=1), "unexpected extra"),
        (lambda h: h.update(dtype="bfloat16"), "dtype"),
        (lambda h: h.update(shape=[4, 2]), "shape"),
        (lambda h: h.update(shape=[4, 2, -2]), "shape"),
        (lambda h: h.update(shape=[4, 2, 2.0]), "shape"),
        (lambda h: h.update(width="16"), "width"),
        (lambda h: h.update(width=True), "width"),
        (lambda h: h.update(scaling_factor="x"), "scaling_factor"),
        (lambda h: h.update(pad_right=3), "padding"),
        (lambda h: h.update(width=100, pad_right=-84), "does not fit"),
        (lambda h: h.update(quant={"offset": [0.0], "scale": [1.0]}), "quant"),
        (lambda h: h.update(fingerprint=None), "fingerprint"),
    ],
)
def test_invalid_header_fields_are_named(edit, message):
    x = sd_latents((4, 2, 2))
    head, payload = split(pack(x, **kwargs(x.shape)))
    edit(head)
    with pytest.raises(LatentFormatError, match=message):
        unpack(forge(head, payload))
    with pytest.raises(LatentFormatError, match=message):
        read_header(forge(head, payload))


def test_header_must_be_a_json_object_in_utf8():
    for raw in (b"[1, 2]", b"\xff\xfe{}", b"{not json", b'{"a": NaN}'):
        body = MAGIC + struct.pack("<HI", 1, len(raw)) + raw
        blob = body + hashlib.blake2b(body, digest_size=16).digest()
        with pytest.raises(LatentFormatError, match="header"):
            unpack(blob)


def test_int8_quant_must_be_well_formed():
    x = sd_latents((2, 2, 2))
    head, payload = split(pack(x, dtype="int8", **kwargs(x.shape)))
    for quant in (None, {"offset": [0.0, 0.0]}, {"offset": [0, 0], "scale": [-1.0, 1.0]}):
        bad = dict(head, quant=quant)
        with pytest.raises(LatentFormatError, match="quant"):
            unpack(forge(bad, payload))


def test_every_finite_float16_decodes_exactly():
    # unpack converts halves with its own bit arithmetic; check all 63488 finite patterns,
    # subnormals and signed zeros included, against numpy's conversion.
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = bits[(bits & 0x7C00) != 0x7C00]
    assert finite.size == 248 * 256
    x = finite.view(np.float16).reshape(1, 248, 256)
    head, _ = split(pack(np.zeros((1, 248, 256), np.float32), **kwargs((1, 248, 256))))
    _, y = unpack(forge(head, x.tobytes()))
    np.testing.assert_array_equal(y.view(np.uint32), x.astype(np.float32).view(np.uint32))


# ---------------------------------------------------------------------------------------------
# blob types


def test_accepts_bytes_bytearray_and_memoryview():
    x = sd_latents()
    blob = pack(x, **kwargs(x.shape))
    expected = unpack(blob)[1]
    padded = b"\x00\x01" + blob + b"\x02"
    for value in (bytearray(blob), memoryview(blob), memoryview(padded)[2:-1]):
        header, y = unpack(value)
        np.testing.assert_array_equal(y, expected)
        assert read_header(value) == header
        assert blob_digest(value) == blob_digest(blob)


def test_accepts_memoryviews_of_other_shapes_and_formats():
    x = sd_latents((4, 2, 2))
    # Pick a fingerprint length that makes the blob a whole number of 4-byte words.
    blob = next(
        b for k in range(4) if len(b := pack(x, **kwargs(x.shape, fingerprint="a" * k))) % 4 == 0
    )
    expected = unpack(blob)
    words = memoryview(bytearray(blob)).cast("I")  # itemsize 4: must be read as bytes
    grid = memoryview(blob).cast("B", shape=[4, len(blob) // 4])  # 2-D
    for value in (words, grid):
        header, y = unpack(value)
        assert header == expected[0]
        np.testing.assert_array_equal(y, expected[1])
        assert blob_digest(value) == blob_digest(blob)


@pytest.mark.parametrize("value", ["LTNT", None, 12, [1, 2]])
def test_rejects_non_bytes(value):
    with pytest.raises(TypeError):
        unpack(value)


# ---------------------------------------------------------------------------------------------
# pack validation


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pack_rejects_non_finite(bad):
    x = sd_latents()
    x[1, 2, 3] = bad
    for dtype in STORAGE_DTYPES:
        with pytest.raises(ValueError, match="NaN or infinity"):
            pack(x, dtype=dtype, **kwargs(x.shape))


def test_pack_rejects_values_beyond_float16():
    x = sd_latents()
    for big in (65520.0, -1e6, 3e38):
        x[0, 0, 0] = big
        for dtype in STORAGE_DTYPES:
            with pytest.raises(ValueError, match="float16 range"):
                pack(x, dtype=dtype, **kwargs(x.shape))
    x[0, 0, 0] = -65519.0  # still rounds to a finite half (-65504)
    _, y = unpack(pack(x, **kwargs(x.shape)))
    assert y[0, 0, 0] == -65504.0


@pytest.mark.parametrize(
    "latents",
    [
        np.zeros((4, 8), np.float32),
        np.zeros((1, 4, 8, 8), np.float32),
        np.zeros((4, 8, 8), np.int32),
        np.zeros((4, 8, 8), bool),
        np.zeros((4, 8, 8), np.complex64),
        np.zeros((4, 0, 8), np.float32),
    ],
)
def test_pack_rejects_bad_arrays(latents):
    with pytest.raises(ValueError):
        pack(latents, **kwargs((4, 8, 8)))


@pytest.mark.parametrize(
    "overrides",
    [
        {"dtype": "float32"},
        {"dtype": "bfloat16"},
        {"width": 8 * 8 + 1},  # needs a 9-cell grid
        {"width": 8 * 7},  # a 7-cell grid would do: the 8th cell is not padding
        {"height": 0},
        {"width": 63.0},
        {"downsample": 0},
        {"scaling_factor": 0.0},
        {"scaling_factor": float("nan")},
        {"shift_factor": float("inf")},
        {"scaling_factor": "0.18"},
        {"autoencoder": ""},
        {"family": None},
        {"fingerprint": 123},
    ],
)
def test_pack_rejects_bad_arguments(overrides):
    x = sd_latents((4, 8, 8))
    kw = kwargs(x.shape)
    dtype = overrides.pop("dtype", "float16")
    kw.update(overrides)
    with pytest.raises(ValueError):
        pack(x, dtype=dtype, **kw)


def test_pack_accepts_numpy_scalars_for_numbers():
    x = sd_latents((4, 8, 8))
    kw = kwargs(
        x.shape,
        width=np.int64(64),
        height=np.int32(60),
        downsample=np.int64(8),
        scaling_factor=np.float32(0.18215),
    )
    header = read_header(pack(x, **kw))
    assert (header.width, header.height, header.pad_bottom) == (64, 60, 4)
    assert type(header.width) is int
    assert header.scaling_factor == pytest.approx(0.18215)


# ---------------------------------------------------------------------------------------------
# properties


@st.composite
def latent_cases(draw):
    c = draw(st.integers(1, 8))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    ds = draw(st.integers(1, 16))
    width = w * ds - draw(st.integers(0, ds - 1))
    height = h * ds - draw(st.integers(0, ds - 1))
    magnitude = float(np.float32(draw(st.sampled_from([1e-6, 1.0, 10.0, 1000.0, 65000.0]))))
    elements = st.floats(-magnitude, magnitude, allow_nan=False, width=32)
    x = draw(hnp.arrays(np.float32, (c, h, w), elements=elements))
    return x, {**ORIGIN, "width": width, "height": height, "downsample": ds}


@settings(max_examples=200, deadline=None)
@given(latent_cases())
def test_property_float16_round_trip(case):
    x, kw = case
    blob = pack(x, **kw)
    header, y = unpack(blob)
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    assert header.shape == x.shape
    assert (header.width, header.height, header.downsample) == (
        kw["width"],
        kw["height"],
        kw["downsample"],
    )
    assert header.pad_right == x.shape[2] * kw["downsample"] - kw["width"]
    assert read_header(blob) == header
    assert blob_digest(blob) == blob_digest(pack(x.copy(), **kw))


@pytest.mark.parametrize("dtype, levels", [("int8", 255), ("int4", 15)])
@settings(max_examples=200, deadline=None)
@given(latent_cases())
def test_property_quantised_error_bound(dtype, levels, case):
    x, kw = case
    header, y = unpack(pack(x, dtype=dtype, **kw))
    assert header.dtype == dtype
    assert np.isfinite(y).all()
    xd = x.astype(np.float64)
    lo, hi = xd.min(axis=(1, 2)), xd.max(axis=(1, 2))
    half_step = (hi - lo) / (2 * levels)
    # float32 arithmetic: rounding (x - lo) / scale can be off by ~1e-4 of a step, and the
    # read-back adds a few ulps of the channel's magnitude.
    f32 = np.finfo(np.float32)
    slack = 4 * f32.eps * np.maximum(np.abs(lo), np.abs(hi)) + 2 * f32.smallest_subnormal
    # A range too small for a normal float32 step is stored as a constant channel.
    bound = np.where(hi - lo < levels * f32.tiny, hi - lo, half_step * (1 + 1e-3)) + slack
    err = np.abs(y - xd).max(axis=(1, 2))
    assert np.all(err <= bound), (err, bound)


@settings(max_examples=200, deadline=None)
@given(latent_cases(), st.sampled_from(STORAGE_DTYPES), st.data())
def test_property_any_corruption_is_detected(case, dtype, data):
    x, kw = case
    blob = pack(x, dtype=dtype, **kw)
    i = data.draw(st.integers(0, len(blob) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != blob[i]), label="value")
    bad = bytearray(blob)
    bad[i] = value
    with pytest.raises(LatentFormatError):
        unpack(bad)
    n = data.draw(st.integers(0, len(blob) - 1), label="truncate")
    with pytest.raises(LatentFormatError):
        unpack(blob[:n])


def test_unpack_can_hand_back_float16_as_stored():
    z = sd_latents()
    blob = pack(z, **kwargs(z.shape))
    header, as_float32 = unpack(blob)
    header16, stored = unpack(blob, float16=True)
    assert header16 == header and stored.dtype == np.float16 and not stored.flags.writeable
    assert np.array_equal(stored.astype(np.float32), as_float32)
    # Quantised blobs are float32 either way.
    _h, int8 = unpack(pack(z, **kwargs(z.shape, dtype="int8")), float16=True)
    assert int8.dtype == np.float32
    # A forged float16 payload holding an infinity is refused, as the float32 path refuses it.
    head = json.loads(bytes(blob[10 : 10 + header_len(blob)]))
    bits = np.frombuffer(z.astype(np.float16).tobytes(), dtype="<u2").copy()
    bits[3] = 0x7C00
    forged = forge(head, bits.tobytes())
    for float16 in (False, True):
        with pytest.raises(LatentFormatError, match="NaN or infinite"):
            unpack(forged, float16=float16)
