"""Text sources and packing into BOS-prefixed windows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ml_collections import ConfigDict

from gsae_jax.data import text

BOS = 0


def test_pack_windows_prefixes_every_window_and_document():
  docs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]
  windows = [w.tolist() for w in text.pack_windows(docs, 4, BOS)]
  # stream: 1 2 3 4 5 B 6 7 B 8 9 ... ; each window = BOS + 3 stream tokens
  assert windows == [[0, 1, 2, 3], [0, 4, 5, 0], [0, 6, 7, 0], [0, 8, 9, 10], [0, 11, 12, 13]]
  assert all(w[0] == BOS and w[1] != BOS for w in windows)  # never BOS BOS
  body = [t for w in windows for t in w[1:] if t != BOS]
  assert body == list(range(1, 14))  # in order, nothing lost but the final partial window (14)
  with pytest.raises(ValueError, match="context_length=1"):
    next(text.pack_windows(docs, 1, BOS))


def test_embedded_corpus_is_large_and_deterministic():
  docs = list(text.embedded_corpus())
  assert sum(len(d) for d in docs) > 500_000
  assert any("for" in d and "statement" in d for d in docs[:100])  # pydoc topics come first
  assert docs == list(text.embedded_corpus())


def test_local_documents_all_formats(tmp_path):
  (tmp_path / "a.txt").write_text("plain text file")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "row one"}) + "\n\n" +
                                    json.dumps({"text": "row two", "id": 3}) + "\n")
  pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), tmp_path / "c.parquet")
  docs = list(text.local_documents([str(tmp_path / "*")]))
  assert docs == ["plain text file", "row one", "row two", "pq one", "pq two"]
  cfg = ConfigDict(dict(source="files", paths=(str(tmp_path / "*.jsonl"),), text_field="text"))
  assert list(text.documents(cfg)) == ["row one", "row two"]


@pytest.mark.parametrize("name, content, message", [
    ("x.jsonl", '{"body": "no text field"}\n', r"x.jsonl:1: expected field 'text'"),
    ("x.jsonl", "not json\n", r"x.jsonl:1: not a JSON object per line"),
    ("x.csv", "a,b\n", r"x.csv: unsupported text file type '.csv'"),
])
def test_local_documents_errors_name_the_file(tmp_path, name, content, message):
  (tmp_path / name).write_text(content)
  with pytest.raises(ValueError, match=message):
    list(text.local_documents([str(tmp_path / name)]))


def test_no_matching_files_and_bad_source(tmp_path):
  with pytest.raises(ValueError, match="no files match"):
    list(text.local_documents([str(tmp_path / "*.txt")]))
  with pytest.raises(ValueError, match="config.text.source: expected"):
    text.documents(ConfigDict(dict(source="web")))


def test_tokenize_documents_batches_and_skips_empty():
  calls = []
  def encode(texts):
    calls.append(len(texts))
    return [[len(t)] for t in texts]
  out = list(text.tokenize_documents(["ab", "", "  ", "abc", "a"], encode, batch_docs=2))
  assert out == [[2], [3], [1]] and calls == [2, 1]
