"""A raw GGUF byte builder and the negative corpus for the GGUF reader (native/src/gguf.c).

Every field can be set to any value, so each case breaks exactly one rule of the format. Used by tests/test_gguf.py
and, as `python3 tests/gguf_corpus.py DIR`, by tools/asan_gguf.sh to dump the corpus (cases, every truncation of a
small valid file, seeded random mutations) plus a manifest `EXPECTED_STATUS path` per line for tests/native/gguf_check.c.
"""
from __future__ import annotations

import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

# KV value types (GGUF spec numbering) and their little-endian scalar encodings.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
              U64: "<Q", I64: "<q", F64: "<d"}

# ggml tensor types: id -> (name, block size, bytes per block). Same table as gguf.c; test_gguf.py checks it against
# gguf-py's GGML_QUANT_SIZES (except Q8_1, which ggml defines as 36 bytes and gguf-py 0.19 still lists as 40).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
T_F32, T_F16, T_Q4_0, T_Q8_0 = 0, 1, 2, 8

M64 = (1 << 64) - 1


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & M64)  # negative values wrap, as a writer bug would


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def val(vtype: int, v) -> bytes:
    """Encoded value of a scalar or string (no type id)."""
    return gstr(v) if vtype == STRING else struct.pack(SCALAR_FMT[vtype], v)


def arr(etype: int, values: list, n: int | None = None) -> bytes:
    """Encoded array value: element type, count (overridable), elements."""
    return u32(etype) + u64(len(values) if n is None else n) + b"".join(val(etype, v) for v in values)


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """A raw KV: key, type id, payload (already encoded: use val() or arr())."""
    return gstr(key) + u32(vtype) + payload


def nbytes_of(ttype: int, dims: list[int]) -> int:
    _, bs, ts = GGML_TYPES[ttype]
    n = ts * (dims[0] // bs)
    for d in dims[1:]:
        n *= d
    return n


def _data_end(t: Tensor, off: int) -> int:
    """Where a tensor's data ends, for laying out the builder's data section (absurd shapes take no room)."""
    try:
        n = nbytes_of(t.ttype, t.dims)
    except (KeyError, ZeroDivisionError, IndexError):
        return off
    return off + n if 0 <= n < 1 << 24 and 0 <= off < 1 << 24 else 0


@dataclass
class Tensor:
    name: str | bytes
    dims: list[int]
    ttype: int = T_F32
    offset: int | None = None  # None: packed after the previous tensor (in list order), padded to the alignment
    n_dims: int | None = None  # None: len(dims)

    def info(self, offset: int) -> bytes:
        return (gstr(self.name) + u32(len(self.dims) if self.n_dims is None else self.n_dims)
                + b"".join(u64(d) for d in self.dims) + u32(self.ttype) + u64(offset))


def build(kvs: list[bytes], tensors: list[Tensor], *, version: int = 3, magic: bytes = b"GGUF",
          n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32,
          data_size: int | None = None) -> bytes:
    """A GGUF image. Data follows the infos at the next multiple of `alignment`, without padding after the last
    tensor (so every proper prefix of the result is truncated). data_size overrides the data section's length."""
    offsets, pos = [], 0
    for t in tensors:
        off = pos if t.offset is None else t.offset
        offsets.append(off)
        pos = max(pos, -(-_data_end(t, off) // alignment) * alignment)
    out = bytearray(magic + u32(version) + u64(len(tensors) if n_tensors is None else n_tensors)
                    + u64(len(kvs) if n_kv is None else n_kv))
    for k in kvs:
        out += k
    for t, off in zip(tensors, offsets):
        out += t.info(off)
    if not tensors and data_size is None:
        return bytes(out)
    out += bytes(-len(out) % alignment)
    if data_size is None:
        data_size = max([0] + [_data_end(t, off) for t, off in zip(tensors, offsets)])
    out += bytes((i * 7 + 3) & 0xFF for i in range(data_size))
    return bytes(out)


def base_kvs() -> list[bytes]:
    return [
        kv("general.architecture", STRING, val(STRING, "llama")),
        kv("test.u32", U32, val(U32, 7)),
        kv("test.i32", I32, val(I32, -5)),
        kv("test.f32", F32, val(F32, 0.5)),
        kv("test.bool", BOOL, val(BOOL, 1)),
        kv("tokenizer.ggml.tokens", ARRAY, arr(STRING, ["a", "bc", ""])),
        kv("test.i32s", ARRAY, arr(I32, [1, -2, 3])),
    ]


def base_tensors() -> list[Tensor]:
    return [Tensor("a", [8, 2], T_F32), Tensor("b", [32, 2], T_Q4_0), Tensor("c", [64], T_Q8_0)]


def valid_small() -> bytes:
    """A small valid file: 7 KVs of several kinds and 3 tensors of 3 types (ends exactly at its last tensor)."""
    return build(base_kvs(), base_tensors())


BAD, IO, UNSUP, OK = "SP_ERR_BAD_FORMAT", "SP_ERR_IO", "SP_ERR_UNSUPPORTED", "SP_OK"


def _with_kv(extra: bytes) -> bytes:
    return build(base_kvs() + [extra], base_tensors())


def _with_tensor(t: Tensor) -> bytes:
    return build(base_kvs(), base_tensors() + [t])


def _tensors(*ts: Tensor) -> bytes:
    return build(base_kvs(), list(ts))


def cases() -> dict[str, tuple[bytes, str, str]]:
    """name -> (image, expected status, text the message must contain)."""
    K, T = base_kvs(), base_tensors()
    c: dict[str, tuple[bytes, str, str]] = {}
    # header
    c["bad_magic"] = (build(K, T, magic=b"GGUG"), BAD, "magic")
    c["magic_only"] = (b"GGUF", BAD, "version")
    c["too_short"] = (b"GG", BAD, "magic")
    c["version_1"] = (build(K, T, version=1), BAD, "version 1")
    c["version_0"] = (build(K, T, version=0), BAD, "version 0")
    c["version_4"] = (build(K, T, version=4), BAD, "version 4")
    c["version_big_endian"] = (build(K, T, version=3 << 24), BAD, "big-endian")
    c["n_tensors_negative"] = (build(K, T, n_tensors=-1), BAD, "negative")
    c["n_kv_negative"] = (build(K, T, n_kv=-5), BAD, "negative")
    c["n_kv_huge"] = (build(K, T, n_kv=1 << 40), BAD, "cannot fit")
    c["n_tensors_huge"] = (build(K, T, n_tensors=1 << 40), BAD, "cannot fit")
    left = len(build(K, T)) - 24  # each count alone fits in the bytes after the header, both together do not
    c["n_kv_both_near_limit"] = (build(K, T, n_kv=left // 14, n_tensors=left // 33), BAD, "cannot fit")
    c["n_kv_one_too_many"] = (build(K, [], n_kv=len(K) + 1), BAD, "truncated")
    c["n_tensors_one_too_many"] = (build(K, T, n_tensors=len(T) + 1), BAD, "tensor")
    # keys
    c["key_len_wraps"] = (build([gstr(b"k", M64) + u32(U8) + b"\0"] + K, T), BAD, "key length")
    c["key_len_huge"] = (build([gstr(b"k", 1 << 40) + u32(U8) + b"\0"] + K, T), BAD, "exceeds")
    c["key_empty"] = (_with_kv(kv("", U8, val(U8, 1))), BAD, "empty key")
    c["key_nul"] = (_with_kv(kv(b"a\0b", U8, val(U8, 1))), BAD, "NUL")
    c["key_duplicate"] = (_with_kv(kv("test.u32", U32, val(U32, 8))), BAD, "duplicate key 'test.u32'")
    # values
    c["vtype_unknown_13"] = (_with_kv(kv("x.bad", 13, b"\0" * 8)), BAD, "unknown value type 13")
    c["vtype_unknown_max"] = (_with_kv(kv("x.bad", 0xFFFFFFFF, b"\0" * 8)), BAD, "key 'x.bad': unknown value type")
    c["string_len_wraps"] = (_with_kv(kv("x.s", STRING, gstr(b"abc", M64 - 1))), BAD, "key 'x.s'")
    c["string_len_past_eof"] = (build(K + [kv("x.s", STRING, gstr(b"abc", 4))], []), BAD, "exceeds")
    c["bool_value_2"] = (_with_kv(kv("x.b", BOOL, b"\x02")), BAD, "bool")
    c["scalar_truncated"] = (build(K[:-1] + [kv("x.u", U64, val(U64, 1))], [])[:-2], BAD, "key 'x.u': truncated")
    # arrays
    c["array_nested"] = (_with_kv(kv("x.a", ARRAY, u32(ARRAY) + u64(1) + arr(U8, [1]))), BAD, "nested")
    c["array_elem_unknown"] = (_with_kv(kv("x.a", ARRAY, u32(99) + u64(1) + b"\0" * 8)), BAD,
                               "unknown array element type 99")
    c["array_n_times_size_wraps"] = (_with_kv(kv("x.a", ARRAY, arr(U64, [1, 2], n=(1 << 61) + 1))), BAD,
                                     "runs past the end")
    c["array_past_eof"] = (_with_kv(kv("x.a", ARRAY, arr(U32, [1, 2], n=10_000))), BAD, "key 'x.a'")
    c["array_of_strings_huge"] = (_with_kv(kv("x.a", ARRAY, arr(STRING, ["a"], n=1 << 60))), BAD, "strings cannot fit")
    c["array_string_len_huge"] = (_with_kv(kv("x.a", ARRAY, u32(STRING) + u64(2) + gstr("a") + gstr(b"b", M64))), BAD,
                                  "string 1 of 2")
    c["array_bool_3"] = (_with_kv(kv("x.a", ARRAY, arr(U8, [0, 1, 3]).replace(u32(U8), u32(BOOL), 1))), BAD, "bool")
    # general.alignment
    c["alignment_u64"] = (build(K + [kv("general.alignment", U64, val(U64, 32))], T), BAD, "general.alignment")
    c["alignment_string"] = (build(K + [kv("general.alignment", STRING, val(STRING, "32"))], T), BAD, "expected u32")
    c["alignment_zero"] = (build(K + [kv("general.alignment", U32, val(U32, 0))], T), BAD, "power of two")
    c["alignment_48"] = (build(K + [kv("general.alignment", U32, val(U32, 48))], T, alignment=48), BAD, "power of two")
    # tensor infos
    c["tensor_name_empty"] = (_with_tensor(Tensor("", [4])), BAD, "empty name")
    c["tensor_name_64"] = (_with_tensor(Tensor("n" * 64, [4])), BAD, "limit is 63")
    c["tensor_name_huge_len"] = (build(K, [], n_tensors=1) + gstr(b"a", 1 << 50) + bytes(40), BAD,
                                 "tensor 0: name length")
    c["tensor_name_nul"] = (_with_tensor(Tensor(b"x\0y", [4])), BAD, "NUL")
    c["tensor_name_duplicate"] = (_with_tensor(Tensor("b", [4])), BAD, "duplicate tensor name 'b'")
    c["n_dims_0"] = (_with_tensor(Tensor("d", [], n_dims=0)), BAD, "n_dims is 0")
    c["n_dims_5"] = (_with_tensor(Tensor("d", [1, 1, 1, 1, 4], n_dims=5)), BAD, "n_dims is 5")
    c["n_dims_max"] = (_with_tensor(Tensor("d", [4], n_dims=0xFFFFFFFF)), BAD, "n_dims")
    c["dim_zero"] = (_with_tensor(Tensor("d", [4, 0])), BAD, "tensor 'd': dimension 1 is 0")
    c["dim_negative"] = (_with_tensor(Tensor("d", [-4])), BAD, "dimension 0 is -4")
    c["dims_product_overflow"] = (_with_tensor(Tensor("d", [1 << 32, 1 << 32])), BAD, "overflows")
    c["nbytes_overflow"] = (_with_tensor(Tensor("d", [1 << 62], 28)), BAD, "size in bytes overflows")
    for bad_type in (4, 5, 31, 33, 36, 38, 42, 1000, 0xFFFFFFFF):
        c[f"tensor_type_{bad_type}"] = (_with_tensor(Tensor("d", [256], bad_type)), BAD,
                                        f"unknown or removed tensor type {bad_type}")
    c["tensor_type_newer_40"] = (_with_tensor(Tensor("d", [64], 40)), UNSUP, "NVFP4")
    c["ne0_not_block_multiple"] = (_with_tensor(Tensor("d", [16, 2], T_Q4_0)), BAD, "block size 32 of type Q4_0")
    c["ne0_not_block_multiple_k"] = (_with_tensor(Tensor("d", [128], 12)), BAD, "block size 256 of type Q4_K")
    # tensor data layout
    a, b = Tensor("a", [8, 2]), Tensor("b", [32, 2], T_Q4_0)
    c["offset_misaligned"] = (_tensors(a, Tensor("b", [32, 2], T_Q4_0, offset=68)), BAD,
                              "tensor 'b': offset 68 is not a multiple of the alignment 32")
    c["offset_overlap"] = (_tensors(a, Tensor("b", [32, 2], T_Q4_0, offset=32)), BAD, "overlaps tensor 'a'")
    c["offset_same"] = (_tensors(a, Tensor("b", [32, 2], T_Q4_0, offset=0)), BAD, "overlaps")
    c["offset_gap"] = (_tensors(a, Tensor("b", [32, 2], T_Q4_0, offset=128)), BAD, "gap")
    c["offset_first_not_zero"] = (_tensors(Tensor("a", [8, 2], offset=32), Tensor("b", [32, 2], T_Q4_0, offset=96)),
                                  BAD, "tensor 'a': offset 32 leaves a gap")
    c["offset_past_eof"] = (build(K, [a, b], data_size=99), BAD, "tensor 'b': 36 bytes at offset 64 run past the end")
    c["offset_wraps"] = (_tensors(a, Tensor("b", [32, 2], T_Q4_0, offset=M64 - 31)), BAD, "run past the end")
    c["data_section_missing"] = (build(K, [a])[:-64 - 1], BAD, "truncated")
    c["data_section_short"] = (build(K, [a], data_size=10), BAD, "run past the end")
    return c


def valid_cases() -> dict[str, bytes]:
    """Edge cases that must parse."""
    K = base_kvs()
    return {
        "small": valid_small(),
        "version_2": build(K, base_tensors(), version=2),
        "no_tensors": build(K, []),
        "no_kv_no_tensors": build([], []),
        "name_63": build(K, [Tensor("n" * 63, [4])]),
        "info_order_reversed": build(K, [Tensor("c", [64], T_Q8_0, offset=128), Tensor("b", [32, 2], T_Q4_0, offset=64),
                                         Tensor("a", [8, 2], offset=0)]),
        "alignment_64": build(K + [kv("general.alignment", U32, val(U32, 64))], base_tensors(), alignment=64),
        "alignment_1": build(K + [kv("general.alignment", U32, val(U32, 1))], base_tensors(), alignment=1),
        "four_dims": build(K, [Tensor("d", [32, 2, 3, 4], T_Q8_0)]),
        "k_quant_and_iq": build(K, [Tensor("q4k", [256, 2], 12), Tensor("iq2", [512], 16), Tensor("mx", [64], 39)]),
        "empty_arrays": build(K + [kv("x.e", ARRAY, arr(STRING, [])), kv("x.f", ARRAY, arr(F64, []))], []),
        "trailing_bytes": valid_small() + b"\0" * 100,
    }


def mutations(seed: int, count: int, base: bytes | None = None) -> list[bytes]:
    """Seeded random corruptions of a valid file: byte flips, interesting integers, inserts, deletes, truncations."""
    rng = random.Random(seed)
    src = base if base is not None else valid_small()
    interesting = [0, 1, 2, 3, 4, 5, 31, 32, 33, 63, 64, 255, 256, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, M64,
                   M64 - 7, len(src), len(src) + 1]
    out = []
    for _ in range(count):
        b = bytearray(src)
        for _ in range(rng.randint(1, 4)):
            op, i = rng.randrange(5), rng.randrange(len(b) or 1)
            if op == 0 and b:
                b[i] ^= 1 << rng.randrange(8)
            elif op == 1 and b:
                b[i] = rng.randrange(256)
            elif op == 2:
                w = rng.choice([4, 8])
                b[i:i + w] = (rng.choice(interesting) & ((1 << 8 * w) - 1)).to_bytes(w, "little")
            elif op == 3:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
            else:
                del b[i:i + rng.randint(1, 9)]
        out.append(bytes(b))
    return out


def dump(directory: Path, n_mutations: int = 2000, extra: list[Path] = ()) -> Path:
    """Write every case, truncation and mutation under directory with a manifest; return the manifest's path."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []

    def put(name: str, data: bytes, expect: str) -> None:
        p = directory / f"{name}.gguf"
        p.write_bytes(data)
        lines.append(f"{expect} {p}")

    for name, (data, status, _) in cases().items():
        put(f"bad_{name}", data, status)
    for name, data in valid_cases().items():
        put(f"ok_{name}", data, OK)
    small = valid_small()
    for n in range(len(small)):
        put(f"trunc_{n:05d}", small[:n], BAD)
    for i, data in enumerate(mutations(1234, n_mutations)):
        put(f"mut_{i:05d}", data, "ANY")
    lines.append(f"{IO} {directory / 'does_not_exist.gguf'}")
    lines.append(f"{IO} {directory}")
    for p in extra:
        lines.append(f"{OK} {p}")
    manifest = directory / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: gguf_corpus.py DIR [N_MUTATIONS] [VALID_FILE...]")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    print(dump(Path(sys.argv[1]), n, [Path(p) for p in sys.argv[3:]]))
