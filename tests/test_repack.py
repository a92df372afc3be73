"""Load-time weight repacking (sp_model_params.repack): the packed kernels read the same bytes in the same summation
order as the unpacked ones, so logits must be bit-identical with repack on and off -- on tiny models of every
quantized type (tied and separate heads, vocabularies that are not a multiple of the row group, mmap and read) and
on the shipped SmolLM2 (Q4_1 layers, tied Q8_0 head), for one token and for batches."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from sparrow.runtime import Model
from tiny_llama import TinyConfig, write_tiny_llama

Q = gguf.GGMLQuantizationType
TOKENS = [1, 5, 100, 260, 261, 7, 42, 270, 3, 99, 150, 200, 33]


def logits(path, repack: bool, tokens: list[int], threads: int, use_mmap: bool = True) -> np.ndarray:
    with Model(path, repack=repack, use_mmap=use_mmap) as m, m.session(n_ctx=128, n_threads=threads) as s:
        first = s.eval(tokens, logits="all")
        step = s.eval(tokens[:1], logits="all")  # one more token after the batch (T = 1)
    return np.concatenate([first, step])


@pytest.mark.parametrize("wtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("use_mmap", [True, False])
def test_repack_gives_identical_logits(tmp_path, wtype, tied, use_mmap):
    path = write_tiny_llama(tmp_path / "m.gguf", TinyConfig(wtype=wtype, tied=tied))
    for threads in (1, 3):
        a = logits(path, False, TOKENS, threads, use_mmap)
        b = logits(path, True, TOKENS, threads, use_mmap)
        np.testing.assert_array_equal(a, b)


def test_repack_smollm_identical_logits(smollm_path):
    with Model(smollm_path) as m:
        toks = m.tokenize("The lighthouse keeper opened the bottle and read", add_special=True)
    for threads in (1, 2):
        np.testing.assert_array_equal(logits(smollm_path, False, toks, threads),
                                      logits(smollm_path, True, toks, threads))
