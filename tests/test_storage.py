"""Storage layer of the writer: chunk shapes, compression settings, DatasetAppender.

Real HDF5 files in tmp_path, read back with h5py.
"""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import h5py
import hdf5plugin
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blissdata import bslz4
from writer.hdf5.chunking import chunk_shape
from writer.hdf5.compression import (compression_kwargs, dataset_is_bslz4, is_bslz4,
                                parse_compression)
from writer.hdf5.dataset_writer import DatasetAppender


# ---------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("dtype, shape, expected", [
    ("float64", (), (131072,)),
    ("int32", (), (262144,)),
    ("uint16", (512, 512), (1, 512, 512)),
    ("uint32", (2048, 2048), (1, 1024, 2048)),
    ("uint32", (4096, 4096), (1, 512, 4096)),
    ("uint32", (3000, 1000), (1, 1500, 1000)),
    ("uint32", (4096,), (64, 4096)),
    ("uint32", (-1,), (256, 1024)),
    ("float32", (-1, -1), (1, 256, 256)),
    ("uint16", (-1, 2048), (1, 1024, 2048)),
    ("float64", (2, 3_000_000), (1, 1, 1_000_000)),
])
def test_chunk_shape(dtype, shape, expected):
    """Rules 1-4, for a long scan (npoints = 2**24: a whole number of any such chunk)."""
    assert chunk_shape(dtype, shape, npoints=2**24) == expected


@pytest.mark.parametrize("dtype, shape, expected", [
    ("float64", (), (1024,)),            # 8 KiB
    ("uint8", (), (1024,)),
    ("uint32", (4096,), (64, 4096)),     # points with a shape: rule 4
    ("uint16", (512, 512), (1, 512, 512)),  # frames: one per chunk, as rule 3
])
def test_chunk_shape_of_a_scan_of_unknown_length(dtype, shape, expected):
    """Rule 6: without npoints, scalars get small chunks (the last one takes its whole size
    in the file); count_time only makes them smaller."""
    assert chunk_shape(dtype, shape) == expected
    assert chunk_shape(dtype, shape, count_time=0.001) == expected
    assert chunk_shape(dtype, shape, count_time=10)[0] <= expected[0]


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64", "complex128"])
@pytest.mark.parametrize("shape", [(), (3,), (100,), (1000, 3), (64, 64), (700, 900),
                                   (5000, 5000), (-1,), (-1, 10), (-1, -1, -1)])
def test_chunk_shape_rules(dtype, shape):
    chunks = chunk_shape(dtype, shape, npoints=2**24)
    assert chunks == chunk_shape(np.dtype(dtype), list(shape), npoints=2**24)  # deterministic
    itemsize = np.dtype(dtype).itemsize
    nbytes = itemsize * int(np.prod(chunks))
    assert len(chunks) == len(shape) + 1
    assert nbytes <= 8 * 1024 * 1024
    n = chunks[0]
    assert n & (n - 1) == 0  # a power of two
    if n > 1:
        assert nbytes <= 1024 * 1024
        assert 2 * nbytes > 1024 * 1024 or n * 2 * 256 * 1024 < 1024 * 1024
    for c, d in zip(chunks[1:], shape):
        assert c >= 1 and (d == -1 or c <= d)


def test_chunk_shape_bad():
    with pytest.raises(ValueError, match="point shape"):
        chunk_shape("uint16", (0, 3))


# ---------------------------------------------------------------------------- compression
def test_compression_settings():
    assert compression_kwargs() == dict(hdf5plugin.Bitshuffle(cname="lz4"))
    assert compression_kwargs("bitshuffle-lz4") == compression_kwargs(None)
    assert compression_kwargs("none") == {}
    assert compression_kwargs({"name": "gzip", "level": 4}) == {
        "compression": "gzip", "compression_opts": 4, "shuffle": True}
    assert compression_kwargs("zstd") == dict(hdf5plugin.Zstd(clevel=3))
    assert parse_compression({"name": "zstd", "level": 9}).level == 9
    assert parse_compression("blosc2").level == 5
    assert is_bslz4(None) and is_bslz4("bitshuffle-lz4") and is_bslz4("bslz4")
    assert not is_bslz4("zstd") and not is_bslz4({"name": "gzip"}) and not is_bslz4("none")


@pytest.mark.parametrize("setting, match", [
    ("lzma", "unknown name 'lzma'.*bitshuffle-lz4"),
    ({"name": "zstd", "level": 30}, "level 30 for 'zstd' must be an integer from 1 to 22"),
    ({"name": "gzip", "level": "fast"}, "from 0 to 9"),
    ({"name": "bitshuffle-lz4", "level": 3}, "takes no level"),
    ({"level": 3}, "needs a 'name'"),
    ({"name": "gzip", "lvl": 3}, "unknown keys"),
    (42, "must be a name"),
])
def test_compression_bad_settings(setting, match):
    with pytest.raises(ValueError, match=match):
        parse_compression(setting)


@pytest.mark.parametrize("setting", ["bitshuffle-lz4", "zstd", "blosc2", "gzip", "none"])
def test_every_setting_writes_and_reads(tmp_path, setting):
    data = np.random.default_rng(0).poisson(10, size=(5, 100, 100)).astype(np.uint16)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        app = DatasetAppender(f, "d", "uint16", (100, 100), compression=setting)
        app.append(data)
        assert app.close() == 5
        assert dataset_is_bslz4(f["d"]) == is_bslz4(setting)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(f["d"][()], data)


# ---------------------------------------------------------------------------- appender
def _frames(n, shape=(512, 256), seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    base = 3 + 40 * np.exp(-((x - shape[1] / 2) ** 2 + (y - shape[0] / 3) ** 2) / 4000.0)
    return rng.poisson(base, size=(n, *shape)).astype(np.uint16)


def test_frames_parallel_and_direct_chunks(tmp_path):
    frames = _frames(12)
    chunks = [bslz4.compress(f) for f in _frames(5, seed=1)]
    with h5py.File(tmp_path / "f.h5", "w") as f:
        app = DatasetAppender(f, "img", "uint16", (512, 256), attrs={"units": "counts"})
        assert app.chunks == (1, 512, 256) and app.is_bslz4
        app.append(frames[:7])
        app.append_compressed(chunks)
        app.append(frames[7:])
        assert app.npoints == 17
        assert app.flush() == 17 and app.stored == 17 and app.pending_bytes == 0
        # precompressed frames stored untouched
        assert f["img"].id.read_direct_chunk((7, 0, 0))[1] == chunks[0]
        # our compressed chunks are what the filter would have made
        assert f["img"].id.read_direct_chunk((0, 0, 0))[1] == bslz4.compress(frames[0])
        app.close()
    with h5py.File(tmp_path / "f.h5", "r") as f:
        d = f["img"]
        assert d.attrs["units"] == "counts"
        expected = np.concatenate([frames[:7], [bslz4.decompress(c, "uint16", (512, 256))
                                                for c in chunks], frames[7:]])
        np.testing.assert_array_equal(d[()], expected)


def test_caller_may_reuse_its_array(tmp_path):
    buf = np.zeros((4, 512, 256), np.uint16)
    expected = []
    with h5py.File(tmp_path / "f.h5", "w") as f:
        with ThreadPoolExecutor(2) as pool:
            app = DatasetAppender(f, "img", "uint16", (512, 256), executor=pool)
            for i in range(6):
                buf[...] = _frames(4, seed=i)
                expected.append(buf.copy())
                app.append(buf)
            app.close()
        np.testing.assert_array_equal(f["img"][()], np.concatenate(expected))


def test_compressed_frames_into_other_layouts(tmp_path):
    frames = _frames(3, shape=(64, 64))
    chunks = [bslz4.compress(f) for f in frames]
    with h5py.File(tmp_path / "f.h5", "w") as f:
        # small frames: many per chunk -> decompressed and appended
        a = DatasetAppender(f, "small", "uint16", (64, 64))
        a.append_compressed(chunks)
        # gzip: decompressed and appended
        b = DatasetAppender(f, "gz", "uint16", (64, 64), compression="gzip", workers=0)
        b.append_compressed(chunks)
        assert a.close() == 3 and b.close() == 3
        np.testing.assert_array_equal(f["small"][()], frames)
        np.testing.assert_array_equal(f["gz"][()], frames)


def test_large_points_split_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=(3, 3000, 3001), dtype=np.uint8)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        app = DatasetAppender(f, "big", "uint8", (3000, 3001))
        assert app.chunks == (1, 1500, 3001)
        app.append(data[:2])
        app.append(data[2:])
        app.close()
        np.testing.assert_array_equal(f["big"][()], data)


def test_varying_points_padding_and_growth(tmp_path):
    rng = np.random.default_rng(0)
    points = [rng.random(rng.integers(0, 2500)).astype(np.float32) for _ in range(300)]
    with h5py.File(tmp_path / "f.h5", "w") as f:
        app = DatasetAppender(f, "mca", "float32", (-1,))
        for i in range(0, 300, 37):
            app.append_varying(points[i:i + 37])
            if i % 2:
                app.flush()
        app.append(np.ones((2, 10), np.float32))  # smaller than the current extent: padded
        app.close()
        d = f["mca"]
        assert d.maxshape == (None, None) and d.shape == (302, max(map(len, points)))
        assert np.isnan(d.fillvalue)
        data = d[()]
    for i, p in enumerate(points):
        np.testing.assert_array_equal(data[i, :len(p)], p)
        assert np.isnan(data[i, len(p):]).all()
    assert (data[300:, :10] == 1).all() and np.isnan(data[300:, 10:]).all()


def test_varying_2d_with_fill_value(tmp_path):
    rng = np.random.default_rng(1)
    points = [rng.integers(1, 9, size=(rng.integers(1, 600), rng.integers(1, 300)),
                           dtype=np.int16) for _ in range(6)]
    with h5py.File(tmp_path / "f.h5", "w") as f:
        app = DatasetAppender(f, "img", "int16", (-1, -1), fill_value=-1)
        assert app.chunks == (8, 256, 256)
        app.append_varying(points[:2])
        app.flush()
        app.append_varying(points[2:])
        app.close()
        data = f["img"][()]
    for i, p in enumerate(points):
        np.testing.assert_array_equal(data[i, :p.shape[0], :p.shape[1]], p)
        assert (data[i, p.shape[0]:] == -1).all() and (data[i, :, p.shape[1]:] == -1).all()


def test_resume_on_existing_dataset(tmp_path):
    data = np.arange(1000, dtype=np.float64)
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        app = DatasetAppender(f, "x", "float64", ())
        app.append(data[:300])
        app.close()
    with h5py.File(path, "a") as f:
        app = DatasetAppender.open(f["x"])
        assert app.npoints == 300 and app.point_shape == () and app.is_bslz4
        app.append(data[300:])
        assert app.close() == 1000
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][()], data)


def test_bad_appends_say_what_is_wrong(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        app = DatasetAppender(f, "img", "uint16", (512, 256))
        with pytest.raises(ValueError, match=r"'/img'.*float64.*expected dtype uint16"):
            app.append(np.zeros((1, 512, 256)))
        with pytest.raises(ValueError, match=r"'/img'.*shape \(1, 512, 255\).*\(512, 256\)"):
            app.append(np.zeros((1, 512, 255), np.uint16))
        with pytest.raises(ValueError, match=r"shape \(512, 256\) given"):
            app.append(np.zeros((512, 256), np.uint16))  # no points axis
        small = bslz4.compress(np.zeros((10, 10), np.uint16))
        good = bslz4.compress(_frames(1)[0])
        with pytest.raises(ValueError, match=r"frame 1 holds 200 bytes, expected 262144"):
            app.append_compressed([good, small])
        with pytest.raises(ValueError, match=r"frame 0: bslz4 chunk truncated"):
            app.append_compressed([good[:30]], validate=True)
        with pytest.raises(ValueError, match=r"frame 0: bslz4 chunk truncated"):
            app.append_compressed([b"abc"])
        assert app.npoints == 0  # nothing of a refused call was kept
        v = DatasetAppender(f, "v", "uint32", (-1, 4))
        with pytest.raises(ValueError, match=r"point 1.*shape \(1, 3, 5\)"):
            v.append_varying([np.zeros((2, 4), np.uint32), np.zeros((3, 5), np.uint32)])
        with pytest.raises(ValueError, match="fixed point shape"):
            v.append_compressed([good])
        assert app.close() == 0 and v.close() == 0


# ---------------------------------------------------------------------------- property
CONFIGS = {
    # name: (dtype, point_shape, compression, workers) -- small chunks to cross boundaries
    "frames-bslz4-pool": ("uint16", (512, 256), "bitshuffle-lz4", 2),
    "frames-bslz4-default": ("uint16", (512, 256), "bitshuffle-lz4", None),
    "images-8-per-chunk-bslz4": ("float32", (128, 256), "bitshuffle-lz4", 2),
    "images-8-per-chunk-sync": ("float32", (128, 256), "bitshuffle-lz4", 0),
    "images-8-per-chunk-gzip": ("float32", (128, 256), {"name": "gzip", "level": 1}, None),
    "spectra-varying-bslz4": ("uint32", (-1,), "bitshuffle-lz4", None),
    "spectra-varying-zstd": ("uint32", (-1,), "zstd", None),
}

op = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 20)),
    st.tuples(st.just("compressed"), st.integers(0, 4)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0)),
)


@pytest.mark.parametrize("config", list(CONFIGS))
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=12), seed=st.integers(0, 2 ** 16))
def test_any_sequence_reads_back_exactly(tmp_path, config, ops, seed):
    dtype, shape, compression, workers = CONFIGS[config]
    varying = -1 in shape
    rng = np.random.default_rng(seed)
    path = tmp_path / f"{config}-{seed}.h5"
    f = h5py.File(path, "w")
    app = DatasetAppender(f, "d", dtype, shape, compression=compression, workers=workers)
    expected = []  # one array per point

    def make(n):
        if varying:
            return [rng.integers(0, 50, size=rng.integers(0, 1500)).astype(dtype)
                    for _ in range(n)]
        return list(rng.poisson(5, size=(n, *shape)).astype(dtype))

    def check(data):
        assert data.shape[0] == len(expected)
        for got, want in zip(data, expected):
            if varying:
                assert (got[:len(want)] == want).all() and (got[len(want):] == 0).all()
            else:
                np.testing.assert_array_equal(got, want)

    try:
        for kind, n in ops:
            if kind == "append":
                points = make(n * 15 if varying else n)  # 256 spectra per chunk
                if varying:
                    app.append_varying(points)
                else:
                    app.append(np.array(points, dtype=dtype).reshape(n, *shape))
                expected.extend(points)
            elif kind == "compressed" and not varying:
                points = make(n)
                app.append_compressed([bslz4.compress(p) for p in points])
                expected.extend(points)
            elif kind == "flush":
                assert app.flush() == len(expected)
                check(f["d"][()])
            elif kind == "reopen":
                app.close()
                f.close()
                f = h5py.File(path, "a")
                app = DatasetAppender.open(f["d"], workers=workers)
                assert app.npoints == len(expected)
            assert app.npoints == len(expected)
        assert app.close() == len(expected)
    finally:
        f.close()
    with h5py.File(path, "r") as f:
        check(f["d"][()])


# ------------------------------------------------------- partial chunks and crashes
CRASH_SCRIPT = """
import os, sys
import h5py, hdf5plugin, numpy as np
from writer.hdf5.dataset_writer import DatasetAppender
path, compression, more = sys.argv[1], sys.argv[2], int(sys.argv[3])
frames = np.random.default_rng(0).poisson(20, (200, 64, 64)).astype("uint16")
f = h5py.File(path, "w")
app = DatasetAppender(f, "d", "uint16", (64, 64), compression=compression, workers=0)
app.append(frames[:8])
app.flush()
f.flush()  # 8 points durable: what a crash must never take back
app.append(frames[8:8 + more])
app.flush()  # the partial chunk rewritten (in place, or grown), the file not flushed
os._exit(0)  # killed before the file's flush
"""


@pytest.mark.parametrize("compression", ["bitshuffle-lz4", "gzip", "zstd", "none"])
@pytest.mark.parametrize("more", [1, 60])  # a rewrite that fits / one that must grow
def test_crash_while_the_last_chunk_is_rewritten(tmp_path, compression, more):
    """The process dies after the partial chunk was rewritten and before the file's
    metadata flush: the points flushed before read back intact (HDF5 would otherwise have
    put the new chunk over the old one at the same address), and appending resumes."""
    path = tmp_path / "crash.h5"
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(path), compression,
                           str(more)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # read in another process first: a torn Bitshuffle/LZ4 chunk can crash the reader
    check = ("import h5py, hdf5plugin, numpy as np\n"
             "frames = np.random.default_rng(0).poisson(20, (200, 64, 64)).astype('uint16')\n"
             f"d = h5py.File({str(path)!r}, 'r')['d']\n"
             f"assert d.shape[0] in (8, {8 + more}), d.shape\n"
             "assert np.array_equal(d[()], frames[:d.shape[0]])\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    frames = np.random.default_rng(0).poisson(20, (200, 64, 64)).astype("uint16")
    with h5py.File(path, "r") as f:
        stored = f["d"].shape[0]
    with h5py.File(path, "a") as f:
        app = DatasetAppender.open(f["d"], workers=0)
        app.append(frames[stored:200])
        assert app.close() == 200
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["d"][()], frames)


@pytest.mark.parametrize("setting", ["bitshuffle-lz4", {"name": "gzip", "level": 1},
                                     {"name": "zstd", "level": 3},
                                     {"name": "blosc2", "level": 5}])
def test_partial_chunks_padded_then_stored_exactly(tmp_path, setting):
    """Flushed partial chunks are padded (rewrites in place) where the filter allows it;
    the last one is stored at its exact size when the appender closes, and every version
    reads back the same, here and in another process."""
    frames = np.random.default_rng(1).poisson(5, (100, 64, 64)).astype("uint16")
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as f:
        app = DatasetAppender(f, "d", "uint16", (64, 64), compression=setting, workers=0)
        sizes = []
        for start in range(0, 100, 10):
            app.append(frames[start:start + 10])
            app.flush()
            sizes.append(f["d"].id.get_chunk_info(0).size)
            np.testing.assert_array_equal(f["d"][()], frames[:start + 10])
        padded_sizes = sizes
        app.close()
        exact = f["d"].id.get_chunk_info(0).size
        _, raw = f["d"].id.read_direct_chunk((0, 0, 0))
        assert len(raw) == exact
    if parse_compression(setting).name == "blosc2":  # refuses padding: HDF5's own path
        assert exact == sizes[-1]
    else:
        assert len(set(padded_sizes)) < len(padded_sizes)  # rewrites in place, few growths
        assert all(s % 4096 == 0 for s in padded_sizes) and exact < padded_sizes[-1]
    check = ("import sys, h5py, hdf5plugin, numpy as np\n"
             f"d = h5py.File({str(path)!r}, 'r')['d']\n"
             "want = np.random.default_rng(1).poisson(5, (100, 64, 64)).astype('uint16')\n"
             "assert np.array_equal(d[()], want)\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_resume_refuses_a_damaged_last_chunk(tmp_path):
    """A torn Bitshuffle/LZ4 chunk (what a write cut short leaves) would crash HDF5's
    decoder; resuming checks its structure first and says what is wrong instead."""
    path = tmp_path / "torn.h5"
    frames = np.random.default_rng(3).poisson(20, (8, 64, 64)).astype("uint16")
    with h5py.File(path, "w") as f:
        app = DatasetAppender(f, "d", "uint16", (64, 64), workers=0)
        app.append(frames)
        app.flush()
        full = np.zeros((128, 64, 64), "uint16")
        full[:8] = frames
        torn = bslz4.compress(full)[:20000]  # the header and a few blocks: the rest is lost
        f["d"].id.write_direct_chunk((0, 0, 0), torn)
    check = ("import h5py, hdf5plugin\n"
             "from writer.hdf5.dataset_writer import DatasetAppender\n"
             f"f = h5py.File({str(path)!r}, 'a')\n"
             "try:\n"
             "    DatasetAppender.open(f['d'], workers=0)\n"
             "except ValueError as exc:\n"
             "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dataset '/d'" in done.stdout and "last chunk is damaged" in done.stdout
    assert "bslz4 chunk truncated" in done.stdout
