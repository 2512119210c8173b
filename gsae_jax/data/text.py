"""Text for harvests: documents from local files, a Hugging Face dataset or the embedded corpus,
tokenised and packed into fixed BOS-prefixed windows."""

from __future__ import annotations

import ast
import glob
import importlib
import inspect
import json
import os
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

# Standard-library modules whose docstrings join pydoc's topics in the embedded corpus: English
# prose present on every machine with this Python, so a harvest never needs the network.
_DOC_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "gzip", "heapq", "html", "http.client", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "math", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "warnings", "zipfile",
)


_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
                        "site-packages", "dist-packages", "__pycache__", "pydoc_data"}


def stdlib_source_docstrings() -> Iterator[str]:
  """Module, class, function and method docstrings parsed (never imported) from the standard
  library's own .py files, in sorted path order: more English prose present on every machine
  with this Python, read without side effects."""
  root = os.path.dirname(os.__file__)
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS)
    for name in sorted(filenames):
      module = os.path.relpath(os.path.join(dirpath, name), root)[:-3].replace(os.sep, ".")
      module = module.removesuffix(".__init__")
      if not name.endswith(".py") or module in _DOC_MODULES:  # those are already in the corpus
        continue
      try:
        with open(os.path.join(dirpath, name), encoding="utf-8") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, OSError):
        continue
      for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          doc = ast.get_docstring(node)
          if doc and len(doc) > 40:
            yield doc


def embedded_corpus() -> Iterator[str]:
  """The English prose of Python's own documentation: every `pydoc_data.topics` entry, the
  module, class and function docstrings of a fixed list of standard-library modules, then the
  docstrings of the whole standard library's sources (`stdlib_source_docstrings`)."""
  from pydoc_data import topics
  for key in sorted(topics.topics):
    yield topics.topics[key]
  for name in _DOC_MODULES:
    module = importlib.import_module(name)
    if module.__doc__:
      yield module.__doc__
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when touched
      warnings.simplefilter("ignore", DeprecationWarning)
      docs = [inspect.cleandoc(obj.__doc__) for attr, obj in sorted(vars(module).items())
              if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__
              and (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__doc__]
    yield from docs
  yield from stdlib_source_docstrings()


def _files(patterns: Sequence[str]) -> list[str]:
  found = sorted({p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern),
                                                                recursive=True)})
  files = [p for p in found if os.path.isfile(p)]
  if not files:
    raise ValueError(f"text.paths={list(patterns)}: no files match")
  return files


def local_documents(patterns: Sequence[str], text_field: str = "text") -> Iterator[str]:
  """Documents from files in sorted path order: a .txt/.md file is one document; .jsonl and
  .parquet give one document per row from column `text_field`."""
  for path in _files(patterns):
    ext = os.path.splitext(path)[1].lower()
    if ext in (".txt", ".md", ".text"):
      with open(path, encoding="utf-8") as f:
        yield f.read()
    elif ext in (".jsonl", ".json"):
      with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not a JSON object per line ({e})") from None
          if text_field not in row:
            raise ValueError(f"{path}:{line_no}: expected field {text_field!r}, found "
                             f"{sorted(row)[:8]}")
          yield row[text_field]
    elif ext == ".parquet":
      try:
        import pyarrow.parquet as pq
      except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
      table = pq.ParquetFile(path)
      if text_field not in table.schema_arrow.names:
        raise ValueError(f"{path}: expected column {text_field!r}, found "
                         f"{table.schema_arrow.names}")
      for batch in table.iter_batches(columns=[text_field]):
        yield from batch.column(0).to_pylist()
    else:
      raise ValueError(f"{path}: unsupported text file type {ext!r}; expected .txt, .md, .jsonl "
                       "or .parquet")


def hf_documents(name: str, split: str = "train", text_field: str = "text",
                 config_name: str | None = None) -> Iterator[str]:
  """A Hugging Face dataset, streamed (needs the `datasets` package and network access)."""
  try:
    import datasets
  except ImportError:
    raise ValueError(f"text.hf_name={name!r} needs the `datasets` package (pip install datasets); "
                     "offline, use text.source='files' or 'embedded'") from None
  for row in datasets.load_dataset(name, config_name, split=split, streaming=True):
    yield row[text_field]


def tokenize_documents(docs: Iterable[str], encode: Callable[[list[str]], list[list[int]]],
                       batch_docs: int = 256) -> Iterator[list[int]]:
  """Token ids per non-empty document; `encode` maps a list of texts to lists of ids (batched,
  which is what makes fast tokenizers fast)."""
  pending: list[str] = []
  for doc in docs:
    if doc and doc.strip():
      pending.append(doc)
    if len(pending) == batch_docs:
      yield from encode(pending)
      pending = []
  if pending:
    yield from encode(pending)


def hf_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
  """A transformers tokenizer as `encode`, without its own special tokens (we add BOS)."""
  return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack_windows(docs: Iterable[Sequence[int]], context_length: int,
                 bos_id: int) -> Iterator[np.ndarray]:
  """[context_length] int32 windows: BOS, then the next context_length - 1 tokens of the stream
  doc_1 BOS doc_2 BOS doc_3 ... Every document is thus BOS-prefixed (by the window's BOS or by a
  separator) and every window starts with BOS, as the LMs expect. A separator that would directly
  follow the window's BOS is dropped. The final partial window is dropped."""
  if context_length < 2:
    raise ValueError(f"context_length={context_length}: expected >= 2 (BOS plus one token)")
  body = context_length - 1
  buf: list[int] = []
  first = True
  for doc in docs:
    if not first:
      buf.append(bos_id)
    buf.extend(doc)
    first = False
    start = 0
    while True:
      if start < len(buf) and buf[start] == bos_id:
        start += 1  # a separator right after the window's own BOS would be a second BOS
      if len(buf) - start < body:
        break
      yield np.asarray([bos_id] + buf[start:start + body], np.int32)
      start += body
    buf = buf[start:]


def documents(text) -> Iterator[str]:
  """Documents for `config.text` (source: 'embedded' | 'files' | 'hf')."""
  if text.source == "embedded":
    return embedded_corpus()
  if text.source == "files":
    return local_documents(list(text.paths), text.text_field)
  if text.source == "hf":
    if not text.hf_name:
      raise ValueError("config.text.hf_name: expected a dataset name for text.source='hf'")
    return hf_documents(text.hf_name, text.hf_split, text.text_field, text.hf_config or None)
  raise ValueError(f"config.text.source: expected 'embedded', 'files' or 'hf', found "
                   f"{text.source!r}")
