"""Tokenizer training and the tokenized corpus (cached in a data folder shared by all runs).

    data/tokenizer.model   SentencePiece BPE (byte fallback, <unk>=0 <s>=1 </s>=2), trained on the train split
    data/train.npy         uint16 token stream: for each document, <s> then its pieces
    data/val.npy           the same for the validation split
    data/val.txt           the validation text (documents joined by blank lines)
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from .corpus import build_corpus

SPM_OPTIONS = {"model_type": "bpe", "byte_fallback": True, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
               "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
               "allow_whitespace_only_pieces": True, "character_coverage": 1.0, "split_digits": True,
               "max_sentence_length": 8192, "num_threads": 1, "minloglevel": 2, "seed_sentencepiece_size": 200000,
               "input_sentence_size": 0, "shuffle_input_sentence": False}


def prepare(data_dir: Path, vocab_size: int = 4000) -> dict:
    """Build (once) the tokenizer and token streams; returns the data manifest."""
    import sentencepiece as spm

    data_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = data_dir / "manifest.json"
    if manifest_path.is_file():
        m = json.loads(manifest_path.read_text())
        if m.get("vocab_size") == vocab_size:
            return m
    corpus = build_corpus()
    lines = [line for d in corpus.train for line in d.text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   **SPM_OPTIONS)
    (data_dir / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizer.model"))
    stats = {}
    for split in ("train", "val"):
        ids: list[int] = []
        for d in getattr(corpus, split):
            ids.append(sp.bos_id())
            ids.extend(sp.encode(d.text))
        arr = np.asarray(ids, dtype=np.uint16)
        np.save(data_dir / f"{split}.npy", arr)
        stats[split] = {"files": len(getattr(corpus, split)), "chars": sum(len(d.text) for d in getattr(corpus, split)),
                        "tokens": int(arr.size)}
    (data_dir / "val.txt").write_text(corpus.text("val"), encoding="utf-8")
    m = {"vocab_size": vocab_size, "corpus_root": corpus.root, "splits": stats,
         "val_files": [d.path for d in corpus.val]}
    manifest_path.write_text(json.dumps(m, indent=2))
    return m
