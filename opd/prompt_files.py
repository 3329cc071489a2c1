"""Prompt datasets from JSONL or parquet: one `PromptRecord` per usable row, and a seeded train/eval split.

Accepted inputs (`load_records(path)`):

* a ``.jsonl`` file, one JSON object per line (blank lines are ignored);
* a ``.parquet`` file;
* a directory of ``*.parquet`` files (not recursive), read in name order; all of them must take their prompt
  (and answer) from the same field.

The prompt comes from the first of `PROMPT_FIELDS` present in the file's schema (for JSONL: the union of the
keys of all lines), and that field decides for the whole file; the gold answer likewise from `ANSWER_FIELDS`
(optional). A ``messages`` prompt is a chat: a trailing assistant message is the gold answer, so it is dropped
from the prompt and used as the answer when the row has no answer of its own. Rows whose prompt is null or
empty are skipped and counted (`LoadedRecords.num_skipped_empty`); every other problem stops the load with a
`DatasetError` that names the file (and line or row) and the fix.

Why JSONL is parsed with the `json` module line by line rather than `pyarrow.json`: pyarrow's reader reports
no line numbers, infers ISO-8601-looking strings as timestamps (an answer "2020-01-01" would come back as a
datetime), and rejects a column that mixes numbers and strings, which is common for ``answer``. Parquet is
typed, so it is read with `pyarrow.parquet`, only the needed columns.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

PROMPT_FIELDS = ("messages", "prompt", "question", "problem")  # precedence order
ANSWER_FIELDS = ("answer", "solution")


class DatasetError(ValueError):
    """A bad dataset: one line that names the file (and line or row), the problem, and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    # Text, or chat messages as ({"role": ..., "content": ...}, ...) with only those two keys, the last of
    # which is never an assistant message.
    prompt: str | tuple[dict, ...]
    answer: str | None  # gold answer as text (numbers converted with str); None if the row has none
    source: str  # where it came from: "data.jsonl:17" (1-based line) or "part-0.parquet#row 3" (0-based row)
    gold_prefix: str | None = None  # data.gold_prefix_field's text (the hybrid's gold prefix), when asked for


@dataclass(frozen=True)
class LoadedRecords:
    """What `load_records` returns: the usable records in file order, and what was skipped."""

    records: list[PromptRecord]
    num_skipped_empty: int  # rows whose prompt was null, empty or whitespace only (or a chat with no message)
    prompt_field: str  # the field the prompts came from, one of PROMPT_FIELDS
    answer_field: str | None  # the field the answers came from, one of ANSWER_FIELDS, or None


class RecordSplit(NamedTuple):
    train: list[PromptRecord]
    eval: list[PromptRecord]


def load_records(path: str | Path, *, prefix_field: str | None = None) -> LoadedRecords:
    """Load the prompt records of a ``.jsonl`` file, a ``.parquet`` file or a directory of parquet files.

    Raises `DatasetError` for: a missing path, an unsupported extension, a directory without ``*.parquet``
    files, a malformed JSONL line or one that is not an object (message starts with ``file:line:``), a file
    without any of `PROMPT_FIELDS`, a prompt or answer of the wrong type, and a dataset with no usable record.
    `prefix_field`: a further text field read into each record's `gold_prefix` (the hybrid's gold prefix); a
    dataset without it is refused.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory; give a .jsonl file, a .parquet file or a "
                           "directory of .parquet files")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not files:
            raise DatasetError(f"{path}: directory has no *.parquet files; put the parquet shards directly "
                               "in it or give a .jsonl/.parquet file")
    elif path.suffix.lower() in (".jsonl", ".parquet"):
        files = [path]
    else:
        raise DatasetError(f"{path}: unsupported extension {path.suffix!r}; convert it to .jsonl (one JSON "
                           "object per line) or .parquet")

    records: list[PromptRecord] = []
    num_rows, num_skipped = 0, 0
    fields: tuple[str, str | None] | None = None
    for file in files:
        if file.suffix.lower() == ".jsonl":
            file_fields, rows = _read_jsonl(file)
        else:
            file_fields, rows = _read_parquet(file, prefix_field)
        if fields is not None and file_fields != fields:
            raise DatasetError(f"{file}: takes prompt/answer from {file_fields} but {files[0].name} from "
                               f"{fields}; make the files of {path} use the same columns")
        fields = file_fields
        num_rows += len(rows)
        if prefix_field is not None and not any(prefix_field in row for _, row in rows):
            names = sorted({k for _, row in rows for k in row})
            raise DatasetError(f"{file}: data.gold_prefix_field={prefix_field!r} is not a field of it (it has "
                               f"{names}); name one of them, or 'answer' for the gold answer")
        for source, row in rows:
            record = _to_record(row, *file_fields, source=source)
            if record is not None and prefix_field is not None:
                record = dataclasses.replace(record, gold_prefix=_answer_text(row.get(prefix_field), prefix_field,
                                                                              source))
            if record is None:
                num_skipped += 1
            else:
                records.append(record)

    assert fields is not None
    if not records:
        what = "has no rows" if num_rows == 0 else f"has {num_rows} rows, all with an empty {fields[0]!r}"
        raise DatasetError(f"{path}: dataset {what}; give at least one row with a non-empty prompt")
    return LoadedRecords(records=records, num_skipped_empty=num_skipped, prompt_field=fields[0],
                         answer_field=fields[1])


def split_records(records: list[PromptRecord], *, num_eval: int, seed: int) -> RecordSplit:
    """Shuffle a copy of `records` with `random.Random(seed)`; the first `num_eval` are held out.

    Returns ``(train, eval)`` (a `RecordSplit`), both in shuffled order, disjoint, covering all records. The
    same records and seed always give the same split (Python's shuffle is stable across versions).
    """
    if not 0 <= num_eval < len(records):
        raise DatasetError(f"num_eval={num_eval} must be in [0, {len(records)}) for {len(records)} records so "
                           "that some remain for training; lower the number of eval prompts")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    shuffled = [records[i] for i in order]
    return RecordSplit(train=shuffled[num_eval:], eval=shuffled[:num_eval])


# --------------------------------------------------------------------------------------------------------------
# Readers: each returns the chosen (prompt_field, answer_field) and (source, row dict) pairs
# --------------------------------------------------------------------------------------------------------------


def _choose_fields(file: Path, names: list[str]) -> tuple[str, str | None]:
    prompt_field = next((f for f in PROMPT_FIELDS if f in names), None)
    if prompt_field is None:
        raise DatasetError(f"{file}: no prompt field; found {sorted(names)}, accepted {list(PROMPT_FIELDS)}; "
                           "rename the prompt column to one of them")
    answer_field = next((f for f in ANSWER_FIELDS if f in names), None)
    return prompt_field, answer_field


def _read_jsonl(file: Path) -> tuple[tuple[str, str | None], list[tuple[str, dict]]]:
    rows: list[tuple[str, dict]] = []
    names: dict[str, None] = {}  # union of keys, in order of first appearance
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{file}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file "
                                   "as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove "
                                   "the line") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: a JSON {type(obj).__name__}, not an object; write one "
                                   '{"prompt": ...} object per line')
            names.update(dict.fromkeys(obj))
            rows.append((f"{file.name}:{lineno}", obj))
    if not rows:
        raise DatasetError(f"{file}: dataset has no rows; give at least one JSON object per line")
    return _choose_fields(file, list(names)), rows


def _read_parquet(file: Path, extra: str | None = None) -> tuple[tuple[str, str | None], list[tuple[str, dict]]]:
    try:
        schema = pq.read_schema(file)
        fields = _choose_fields(file, schema.names)
        wanted = [f for f in fields if f is not None] + ([extra] if extra in schema.names else [])
        table = pq.read_table(file, columns=list(dict.fromkeys(wanted)))
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{file}: not a readable parquet file ({e}); rewrite it with pyarrow") from None
    rows = [(f"{file.name}#row {i}", row) for i, row in enumerate(table.to_pylist())]
    return fields, rows


# --------------------------------------------------------------------------------------------------------------
# Row -> record
# --------------------------------------------------------------------------------------------------------------


def _to_record(row: dict, prompt_field: str, answer_field: str | None, *, source: str) -> PromptRecord | None:
    """The record of one row, or None if its prompt is empty (the caller counts it)."""
    value = row.get(prompt_field)
    answer = _answer_text(row.get(answer_field) if answer_field else None, answer_field, source)
    if prompt_field == "messages":
        messages = _messages(value, source)
        if messages and messages[-1]["role"] == "assistant":
            gold = messages.pop()
            if answer is None:
                answer = gold["content"]
        return PromptRecord(prompt=tuple(messages), answer=answer, source=source) if messages else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise DatasetError(f"{source}: {prompt_field!r} is a {type(value).__name__}, expected a string; fix the row")
    return PromptRecord(prompt=value, answer=answer, source=source) if value.strip() else None


def _messages(value: Any, source: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DatasetError(f"{source}: 'messages' is a {type(value).__name__}, expected a list of "
                           '{"role": ..., "content": ...} objects; fix the row')
    messages = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DatasetError(f"{source}: messages[{i}] is not a {{'role': str, 'content': str}} object "
                               f"(got {message!r:.80}); fix the row")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _answer_text(value: Any, answer_field: str | None, source: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Number) and not isinstance(value, bool):  # int, float, Decimal
        return str(value)
    raise DatasetError(f"{source}: {answer_field!r} is a {type(value).__name__}, expected a string or a number; "
                       "fix the row")
