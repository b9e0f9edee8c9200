"""Byte-level text data: tokenizer, the stdlib docstring corpus, the split rule, windows, sampler, ``build``."""

import pytest
import torch

from swinlab.config import DataConfig
from swinlab.data import build
from swinlab.data.text import (
    STDLIB_MODULES,
    ByteTokenizer,
    ByteWindows,
    RandomWindowSampler,
    module_docs,
    split_documents,
    stdlib_docs,
)


def test_tokenizer_round_trips_utf8_bytes():
    tok = ByteTokenizer()
    ids = tok.encode("naïve café")
    assert ids.dtype == torch.int64 and len(ids) == len("naïve café".encode())
    assert tok.decode(ids) == "naïve café"
    assert tok.decode(ids[:3]) == "na\ufffd"  # a window cut inside a character
    with pytest.raises(ValueError, match="byte ids"):
        tok.decode([300])


def test_module_docs_in_source_order_with_qualified_names():
    source = '"""Top."""\nclass A:\n    """Doc A."""\n    def f(self):\n        """Doc f."""\ndef g():\n    pass\n'
    assert module_docs(source, "mod") == "mod\nTop.\n\nmod.A\nDoc A.\n\nmod.A.f\nDoc f.\n\n"


def test_stdlib_corpus_is_real_deterministic_english():
    assert list(STDLIB_MODULES) == sorted(set(STDLIB_MODULES))
    docs = stdlib_docs()
    assert len(docs) == len(STDLIB_MODULES)  # every listed module exists in this interpreter
    text = "".join(docs)
    assert len(text.encode()) > 500_000
    assert "argparse.ArgumentParser" in text and " the " in text
    subset = ("json", "textwrap")  # a second parse (own cache entry) gives the same bytes
    assert stdlib_docs(subset) == (docs[STDLIB_MODULES.index("json")], docs[STDLIB_MODULES.index("textwrap")])


def test_split_keeps_the_last_tenth_of_every_document_for_validation():
    train, val = split_documents([b"a" * 100, "b" * 50])
    assert bytes(train.tolist()) == b"a" * 90 + b"b" * 45
    assert bytes(val.tolist()) == b"a" * 10 + b"b" * 5
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents([b"x"], val_fraction=1.0)


def test_windows_are_next_byte_pairs_and_validation_tiles():
    data = torch.arange(20, dtype=torch.uint8)
    x, y = ByteWindows(data, 4)[3]
    assert x.tolist() == [3, 4, 5, 6] and y.tolist() == [4, 5, 6, 7] and x.dtype == torch.int64
    tiles = ByteWindows(data, 4, stride=4)
    assert len(tiles) == 4 and tiles[3][1].tolist() == [13, 14, 15, 16]
    with pytest.raises(ValueError, match="seq_len"):
        ByteWindows(data[:4], 4, what="the validation text")


def test_sampler_is_a_function_of_seed_and_epoch_and_splits_ranks():
    one = RandomWindowSampler(1000, 6, seed=1, world_size=1)
    assert list(one) == list(RandomWindowSampler(1000, 6, seed=1))
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first
    both = [RandomWindowSampler(1000, 3, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(list(both[0]) + list(both[1])) == sorted(first)


def test_build_text_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file " * 30)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("first file " * 30)
    cfg = DataConfig(name="text", root=str(tmp_path), seq_len=16, batch_size=4)
    bundle = build(cfg, seed=0)
    assert bundle.kind == "text" and bundle.model_kwargs == {"vocab_size": 256, "block_size": 16}
    x, y = next(iter(bundle.train_loader))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert bundle.train_size == (330 + 360) * 9 // 10 // 16  # ~one pass over the training bytes per epoch
    assert sum(b[0].shape[0] for b in bundle.val_loader) == bundle.val_size == 4


def test_build_text_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data\.root is required"):
        build(DataConfig(name="text"), seed=0)
    with pytest.raises(FileNotFoundError, match=r"no \*.txt files"):
        build(DataConfig(name="text", root=str(tmp_path)), seed=0)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="fewer than one window"):
        build(DataConfig(name="text", root=str(tmp_path / "short.txt"), seq_len=64), seed=0)
