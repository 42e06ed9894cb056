"""blissdata.bslz4: byte compatibility with the HDF5 bitshuffle filter (hdf5plugin), both ways."""

import h5py
import hdf5plugin
import numpy as np
import pytest

from blissdata import bslz4

DTYPES = ["uint8", "uint16", "int32", "uint32", "float32", "float64", "complex128"]
SHAPES = [(1,), (7,), (13, 5), (4096 * 3 + 17,), (64, 64)]


def _data(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.poisson(20, size=shape) + np.arange(np.prod(shape)).reshape(shape) % 7) \
        .astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_compatible_with_hdf5_filter(tmp_path, dtype, shape):
    a = _data(dtype, shape)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        d = f.create_dataset("d", shape=shape, dtype=dtype, chunks=shape,
                             **hdf5plugin.Bitshuffle(cname="lz4"))
        offset = (0,) * len(shape)
        # ours -> HDF5
        d.id.write_direct_chunk(offset, bslz4.compress(a))
        np.testing.assert_array_equal(d[()], a)
        # HDF5 -> ours, and byte-identical chunks
        b = _data(dtype, shape, seed=1)
        d[()] = b
        _, chunk = d.id.read_direct_chunk(offset)
        assert bslz4.uncompressed_nbytes(chunk) == b.nbytes
        np.testing.assert_array_equal(bslz4.decompress(chunk, dtype, shape), b)
        assert chunk == bslz4.compress(b)


def test_roundtrip_frame_and_header():
    y, x = np.mgrid[0:512, 0:512]
    frame = np.random.default_rng(3).poisson(5 + 50 * np.exp(-((x - 256) ** 2 + (y - 200) ** 2)
                                                             / 5000.0)).astype(np.uint16)
    chunk = bslz4.compress(frame)
    assert len(chunk) < frame.nbytes / 2
    assert chunk[:8] == frame.nbytes.to_bytes(8, "big")
    assert chunk[8:12] == (4096 * 2).to_bytes(4, "big")  # default block: 4096 elements
    assert bslz4.block_size_bytes("uint16") == 8192
    assert bslz4.block_size_bytes("float64") == 8192
    out = bslz4.decompress(chunk, np.uint16, (512, 512))
    np.testing.assert_array_equal(out, frame)
    assert bslz4.decompress(memoryview(chunk), "uint16", [512, 512]).shape == (512, 512)
    # a non contiguous input is compressed as its C-order copy
    np.testing.assert_array_equal(
        bslz4.decompress(bslz4.compress(frame.T), np.uint16, (512, 512)), frame.T)


def test_bad_inputs_raise_value_error():
    a = np.arange(1000, dtype=np.uint16)
    chunk = bslz4.compress(a)
    with pytest.raises(ValueError, match="truncated: 5 bytes"):
        bslz4.uncompressed_nbytes(chunk[:5])
    with pytest.raises(ValueError, match="truncated"):
        bslz4.decompress(chunk[:5], "uint16", (1000,))
    with pytest.raises(ValueError, match="truncated"):
        bslz4.decompress(chunk[:-3], "uint16", (1000,))
    with pytest.raises(ValueError, match="truncated"):
        bslz4.decompress(chunk[:20], "uint16", (1000,))
    with pytest.raises(ValueError, match="2000 uncompressed bytes, expected 1998"):
        bslz4.decompress(chunk, "uint16", (999,))
    with pytest.raises(ValueError, match="expected 4000"):
        bslz4.decompress(chunk, "uint32", (1000,))
    with pytest.raises(ValueError, match="does not match its blocks"):
        bslz4.decompress(chunk + b"zz", "uint16", (1000,))
    with pytest.raises(ValueError):
        bslz4.decompress(b"x" * 40, "uint16", (1000,))
    bad_block = chunk[:8] + (3).to_bytes(4, "big") + chunk[12:]
    with pytest.raises(ValueError, match="block size"):
        bslz4.decompress(bad_block, "uint16", (1000,))
    garbage = bytearray(chunk)
    garbage[20:40] = b"\xff" * 20
    with pytest.raises(ValueError, match="does not decode"):
        bslz4.decompress(bytes(garbage), "uint16", (1000,))
    with pytest.raises(ValueError):
        bslz4.check_chunk(chunk[:-1], "uint16", (1000,))
    bslz4.check_chunk(chunk, "uint16", (1000,))
    # padded (as the writer stores partial chunks): accepted only when asked, never truncated
    bslz4.check_chunk(chunk + bytes(100), "uint16", (1000,), padded=True)
    with pytest.raises(ValueError, match="does not match its blocks"):
        bslz4.check_chunk(chunk + bytes(100), "uint16", (1000,))
    with pytest.raises(ValueError, match="truncated"):
        bslz4.check_chunk(chunk[:-1], "uint16", (1000,), padded=True)


@pytest.mark.parametrize("dtype", ["float64", "uint16", "int8"])
def test_compress_filled_gives_the_same_bytes(dtype):
    """A chunk partly filled (the rest fill value) compresses to the same chunk, faster."""
    n = (1 << 20) // np.dtype(dtype).itemsize
    block = bslz4.block_size_bytes(dtype) // np.dtype(dtype).itemsize
    for filled in [0, 1, 5, block - 1, block, block + 1, n // 2, n - block - 1, n - 1, n]:
        chunk = np.full(n, np.nan if dtype == "float64" else 7, dtype=dtype)
        chunk[:filled] = np.arange(filled) % 100
        assert bslz4.compress_filled(chunk, filled) == bslz4.compress(chunk), filled
    odd = np.zeros(n + 3, dtype=dtype)  # a trailing partial block: the plain way
    assert bslz4.compress_filled(odd, 10) == bslz4.compress(odd)
