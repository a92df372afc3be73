"""The validating GGUF reader (native/src/gguf.c): valid files parse and read back exactly as gguf-py reads them;
every class of bad input in DESIGN.md ("Bad input") is rejected with SP_ERR_BAD_FORMAT and a message naming the
offending thing; truncations and random corruptions never crash. The corpus lives in tests/gguf_corpus.py;
tools/asan_gguf.sh runs the same corpus under ASan/UBSan/LeakSanitizer and valgrind.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import gguf_corpus as gc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
testing = pytest.importorskip("sparrow.runtime._sparrow").testing

ROOT = Path(__file__).resolve().parents[1]


def validate_all(data: bytes, tmp_path: Path) -> tuple[str, str]:
    """Validate from memory, and from a file with mmap and with read(): all three must agree; return the memory one."""
    mem = testing.gguf_validate_bytes(data)
    p = tmp_path / "x.gguf"
    p.write_bytes(data)
    for use_mmap in (True, False):
        st_, msg = testing.gguf_validate(str(p), use_mmap)
        assert st_ == mem[0], (use_mmap, st_, msg, mem)
        assert msg == (f"{p}: {mem[1]}" if mem[1] else ""), (msg, mem[1])
    return mem


# ---- a C driver for content checks (dump, getters), built from the reader's sources ----

@pytest.fixture(scope="session")
def gguf_check(tmp_path_factory) -> Path:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("gguf_check") / "gguf_check"
    subprocess.run([cc, "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}/native/include",
                    f"-I{ROOT}/native/src", str(ROOT / "native/src/gguf.c"), str(ROOT / "native/src/error.c"),
                    str(ROOT / "tests/native/gguf_check.c"), "-lm", "-o", str(exe)], check=True)
    return exe


def c_dump(exe: Path, path: Path) -> dict:
    out = subprocess.run([str(exe), "--dump", str(path)], check=True, capture_output=True, text=True).stdout
    kvs, tensors, header = {}, [], None
    for line in out.splitlines():
        f = line.split("\t")
        if f[0] == "header":
            header = [int(x) for x in f[1:]]
        elif f[0] == "kv":
            kvs[bytes.fromhex(f[1]).decode()] = f[2:]
        elif f[0] == "tensor":
            tensors.append({"name": f[1], "type": int(f[2]), "n_dims": int(f[3]),
                            "ne": [int(x) for x in f[4].split(",")], "offset": int(f[5]), "nbytes": int(f[6]),
                            "file_offset": int(f[7])})
    return {"header": header, "kvs": kvs, "tensors": tensors}


def assert_same_as_gguf_py(exe: Path, path: Path) -> None:
    """Everything the C reader parsed equals what gguf-py's GGUFReader parses from the same file."""
    ours, ref = c_dump(exe, path), gguf.GGUFReader(path)
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    version, n_kv, n_tensors, alignment, data_offset = ours["header"]
    assert (version, n_kv, n_tensors, alignment, data_offset) == (
        int(ref.fields["GGUF.version"].parts[-1][0]), len(fields), len(ref.tensors), ref.alignment, ref.data_offset)
    assert set(ours["kvs"]) == set(fields)
    for key, field in fields.items():
        got, vtype = ours["kvs"][key], int(field.types[0])
        assert int(got[0]) == vtype, key
        if vtype == gc.STRING:
            assert bytes.fromhex(got[1]) == bytes(field.parts[field.data[0]]), key
        elif vtype == gc.ARRAY:
            etype, n = int(got[1]), int(got[2])
            assert (etype, n) == (int(field.types[1]), len(field.data)), key
            elems = got[3].split(",") if n else []
            if etype == gc.STRING:
                assert [bytes.fromhex(e) for e in elems] == [bytes(field.parts[i]) for i in field.data], key
            else:
                want = [field.parts[i][0] for i in field.data]
                if etype in (gc.F32, gc.F64):
                    np.testing.assert_allclose([float(e) for e in elems], np.float32(want), err_msg=key)
                else:
                    assert [int(e) for e in elems] == [int(w) for w in want], key
        else:
            assert bytes.fromhex(got[1]) == bytes(field.parts[field.data[0]]), key
    assert [t["name"] for t in ours["tensors"]] == [t.name for t in ref.tensors]
    for t, r in zip(ours["tensors"], ref.tensors):
        assert t["type"] == int(r.tensor_type), t["name"]
        assert t["ne"][:t["n_dims"]] == [int(x) for x in r.shape] and t["n_dims"] == len(r.shape), t["name"]
        assert (t["nbytes"], t["file_offset"]) == (int(r.n_bytes), int(r.data_offset)), t["name"]


# ---- valid files ----

def test_type_table_matches_gguf_py():
    sizes = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    for tid, (name, bs, ts) in gc.GGML_TYPES.items():
        assert gguf.GGMLQuantizationType(tid).name == name
        if name == "Q8_1":  # ggml's block_q8_1 is 2 halves + 32 int8 = 36 bytes; gguf-py 0.19 still says 40
            assert sizes[tid] in ((32, 36), (32, 40))
        else:
            assert sizes[tid] == (bs, ts), name
    assert {t for t in sizes if t < 40} == set(gc.GGML_TYPES)


def write_with_gguf_py(path: Path, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name("tiny")
    w.add_uint8("t.u8", 200); w.add_int8("t.i8", -100); w.add_uint16("t.u16", 60000); w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000); w.add_int32("t.i32", -2_000_000_000); w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 1 << 40); w.add_int64("t.i64", -(1 << 40)); w.add_float64("t.f64", 0.25)
    w.add_bool("t.bool", True); w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "", "ü" * 10, "x" * 300])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 8), dtype=np.float32))
    w.add_tensor("f16", rng.standard_normal((5,)).astype(np.float16))
    w.add_tensor("i32", np.arange(12, dtype=np.int32).reshape(2, 2, 3))
    w.add_tensor("four", np.ones((2, 1, 3, 4), dtype=np.float32))
    for tid, (name, bs, ts) in gc.GGML_TYPES.items():
        if bs > 1 and name != "Q8_1":  # raw blocks: 2 rows of 2 blocks
            w.add_tensor(f"q.{name}", rng.integers(0, 256, (2, 2 * ts), dtype=np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType(tid))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_gguf_py_written_file_parses_and_matches(tmp_path, gguf_check, alignment):
    path = write_with_gguf_py(tmp_path / "w.gguf", alignment)
    for use_mmap in (True, False):
        assert testing.gguf_validate(str(path), use_mmap) == ("SP_OK", "")
    assert testing.gguf_validate_bytes(path.read_bytes()) == ("SP_OK", "")
    assert_same_as_gguf_py(gguf_check, path)


def test_smollm_parses_fast_and_matches(smollm_path, gguf_check):
    for use_mmap in (True, False):
        t0 = time.perf_counter()
        assert testing.gguf_validate(str(smollm_path), use_mmap) == ("SP_OK", "")
        elapsed = time.perf_counter() - t0
        assert elapsed < (0.2 if use_mmap else 2.0), elapsed  # mmap: metadata only (~5 ms here)
    assert_same_as_gguf_py(gguf_check, smollm_path)


@pytest.mark.parametrize("name", list(gc.valid_cases()))
def test_valid_edge_cases(name, tmp_path):
    assert validate_all(gc.valid_cases()[name], tmp_path) == ("SP_OK", "")


def test_getters(tmp_path, gguf_check):
    K = [gc.kv("u8", gc.U8, gc.val(gc.U8, 255)), gc.kv("i8", gc.I8, gc.val(gc.I8, -3)),
         gc.kv("u32max", gc.U32, gc.val(gc.U32, 0xFFFFFFFF)), gc.kv("i64neg", gc.I64, gc.val(gc.I64, -(1 << 40))),
         gc.kv("u64small", gc.U64, gc.val(gc.U64, 7)), gc.kv("i32min", gc.I32, gc.val(gc.I32, -(1 << 31))),
         gc.kv("f64", gc.F64, gc.val(gc.F64, 0.1)), gc.kv("f64huge", gc.F64, gc.val(gc.F64, 1e300)),
         gc.kv("f32", gc.F32, gc.val(gc.F32, 2.5)), gc.kv("b", gc.BOOL, gc.val(gc.BOOL, 1)),
         gc.kv("s", gc.STRING, gc.val(gc.STRING, "abc")), gc.kv("arr", gc.ARRAY, gc.arr(gc.I32, [1]))]
    path = tmp_path / "g.gguf"
    path.write_bytes(gc.build(K, []))
    keys = ["u8", "i8", "u32max", "i64neg", "u64small", "i32min", "f64", "f64huge", "f32", "b", "s", "arr", "nokey"]
    out = subprocess.run([str(gguf_check), "--get", str(path), *keys], check=True, capture_output=True,
                         text=True).stdout
    got = {}
    for line in out.splitlines():
        f = line.split("\t")
        if f[0] != "error":
            got[f[0]] = {k: v for k, v in (x.split("=", 1) for x in f[1:6])}
    ok, bad = "SP_OK", "SP_ERR_BAD_FORMAT"
    assert got["u8"]["u32"] == f"{ok}:255" and got["u8"]["i32"] == f"{ok}:255"
    assert got["i8"]["u32"].startswith(bad) and got["i8"]["i32"] == f"{ok}:-3"
    assert got["u32max"]["u32"] == f"{ok}:4294967295" and got["u32max"]["i32"].startswith(bad)
    assert got["i64neg"]["u32"].startswith(bad) and got["i64neg"]["i32"].startswith(bad)
    assert got["u64small"]["u32"] == f"{ok}:7" and got["u64small"]["i32"] == f"{ok}:7"
    assert got["i32min"]["i32"] == f"{ok}:-2147483648"
    assert got["f64"]["f32"] == f"{ok}:{np.float32(0.1):.9g}" and got["f64"]["u32"].startswith(bad)
    assert got["f64huge"]["f32"].startswith(bad)
    assert got["f32"]["f32"] == f"{ok}:2.5" and got["f32"]["bool"].startswith(bad)
    assert got["b"]["bool"] == f"{ok}:1" and got["b"]["u32"].startswith(bad)
    assert got["s"]["str"] == f"{ok}:abc" and got["s"]["f32"].startswith(bad)
    assert all(v.startswith(bad) for v in got["arr"].values())
    assert all(v.startswith(bad) for v in got["nokey"].values())
    assert "missing key 'nokey'" in out and "key 's' has type string, expected f32 or f64" in out
    assert "key 'i64neg' is -1099511627776, which does not fit in a u32" in out
    assert "key 'u32max' is 4294967295, which does not fit in an i32" in out
    assert "key 'f64huge' is 1e+300, which does not fit in a float" in out


# ---- bad input ----

@pytest.mark.parametrize("name", list(gc.cases()))
def test_bad_input_rejected_with_clear_message(name, tmp_path):
    data, status, text = gc.cases()[name]
    got_status, msg = validate_all(data, tmp_path)
    assert got_status == status, msg
    assert text in msg, msg


def test_io_errors(tmp_path):
    st_, msg = testing.gguf_validate(str(tmp_path / "missing.gguf"), True)
    assert st_ == "SP_ERR_IO" and "missing.gguf" in msg and "No such file" in msg
    assert testing.gguf_validate(str(tmp_path), False)[0] == "SP_ERR_IO"
    (tmp_path / "empty.gguf").write_bytes(b"")
    for use_mmap in (True, False):
        st_, msg = testing.gguf_validate(str(tmp_path / "empty.gguf"), use_mmap)
        assert st_ == "SP_ERR_BAD_FORMAT" and "empty" in msg
    assert testing.gguf_validate_bytes(b"")[0] == "SP_ERR_BAD_FORMAT"


def test_every_truncation_rejected():
    for data in (gc.valid_small(), gc.valid_cases()["k_quant_and_iq"]):
        assert testing.gguf_validate_bytes(data)[0] == "SP_OK"
        for n in range(len(data)):
            st_, msg = testing.gguf_validate_bytes(data[:n])
            assert st_ == "SP_ERR_BAD_FORMAT" and msg, (n, st_, msg)


def test_random_mutations_never_crash(tmp_path):
    counts = {}
    for i, data in enumerate(gc.mutations(seed=20240, count=600)):
        st_, msg = testing.gguf_validate_bytes(data)
        assert st_ in ("SP_OK", "SP_ERR_BAD_FORMAT", "SP_ERR_UNSUPPORTED"), (i, st_, msg)
        assert (st_ == "SP_OK") == (msg == ""), (i, st_, msg)
        counts[st_] = counts.get(st_, 0) + 1
    assert counts.get("SP_ERR_BAD_FORMAT", 0) > 300  # the mutations do hit the checks
    # the file paths agree with the memory path on a sample
    for data in gc.mutations(seed=7, count=40):
        validate_all(data, tmp_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hypothesis_structured_garbage(data):
    """A valid prefix up to a random point, then arbitrary bytes: exercises every field with any value."""
    base = gc.valid_small()
    cut = data.draw(st.integers(0, len(base)))
    tail = data.draw(st.binary(max_size=64))
    st_, msg = testing.gguf_validate_bytes(base[:cut] + tail)
    assert st_ in ("SP_OK", "SP_ERR_BAD_FORMAT", "SP_ERR_UNSUPPORTED")
    assert (st_ == "SP_OK") == (msg == "")


def test_messages_are_printable():
    """Names with control or non-ASCII bytes are shown with '?' so messages stay plain text."""
    data = gc.build(gc.base_kvs() + [gc.kv(b"bad\xff\x01key", gc.U32, gc.val(gc.U32, 1)),
                                     gc.kv(b"bad\xff\x01key", gc.U32, gc.val(gc.U32, 1))], [])
    st_, msg = testing.gguf_validate_bytes(data)
    assert st_ == "SP_ERR_BAD_FORMAT" and "duplicate key 'bad??key'" in msg


def test_seeded_corpus_is_deterministic():
    assert gc.mutations(3, 5) == gc.mutations(3, 5)
