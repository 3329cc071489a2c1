"""opd/prompt_files.py: every accepted format, field precedence, skipped rows, every error, the seeded split, and the
shipped arithmetic prompt set."""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd.prompt_files import (ANSWER_FIELDS, PROMPT_FIELDS, DatasetError, LoadedRecords, PromptRecord, load_records,
                          split_records)


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def test_field_constants():
    assert PROMPT_FIELDS == ("messages", "prompt", "question", "problem")
    assert ANSWER_FIELDS == ("answer", "solution")


# --------------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------------


def test_jsonl_prompt(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    loaded = load_records(path)
    assert isinstance(loaded, LoadedRecords)
    assert loaded.records == [PromptRecord(prompt="1+1=", answer="2", source="data.jsonl:1"),
                              PromptRecord(prompt="2+2=", answer=None, source="data.jsonl:2")]
    assert (loaded.num_skipped_empty, loaded.prompt_field, loaded.answer_field) == (0, "prompt", "answer")


def test_jsonl_messages_trailing_assistant_is_the_answer(tmp_path):
    path = tmp_path / "chat.jsonl"
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "What is 3*4?"}
    write_jsonl(path, [
        {"messages": [system, user, {"role": "assistant", "content": "12"}]},  # gold from the assistant turn
        {"messages": [user, {"role": "assistant", "content": "12"}], "answer": 12},  # an answer field wins
        {"messages": [{**user, "name": "x"}]},  # extra keys are dropped; no answer at all
    ])
    records = load_records(path).records
    assert records[0].prompt == (system, user) and records[0].answer == "12"
    assert isinstance(records[0].prompt, tuple)
    assert records[1].prompt == (user,) and records[1].answer == "12"
    assert records[2].prompt == (user,) and records[2].answer is None
    assert [r.source for r in records] == ["chat.jsonl:1", "chat.jsonl:2", "chat.jsonl:3"]


def test_parquet_file_question_answer(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [7, 8], "question": ["q0", "q1"], "answer": ["a0", "a1"]}), path)
    loaded = load_records(path)
    assert loaded.records == [PromptRecord("q0", "a0", "train.parquet#row 0"),
                              PromptRecord("q1", "a1", "train.parquet#row 1")]
    assert (loaded.prompt_field, loaded.answer_field) == ("question", "answer")


def test_parquet_directory_sorted_by_name(tmp_path):
    pq.write_table(pa.table({"problem": ["p2", "p3"], "solution": ["s2", "s3"]}), tmp_path / "part-1.parquet")
    pq.write_table(pa.table({"problem": ["p0", "p1"], "solution": ["s0", "s1"]}), tmp_path / "part-0.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = load_records(tmp_path)
    assert [(r.prompt, r.answer) for r in loaded.records] == [("p0", "s0"), ("p1", "s1"), ("p2", "s2"), ("p3", "s3")]
    assert loaded.records[3].source == "part-1.parquet#row 1"
    assert (loaded.prompt_field, loaded.answer_field) == ("problem", "solution")


def test_parquet_messages(tmp_path):
    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "42"}]]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "chat.parquet")
    (record,) = load_records(tmp_path / "chat.parquet").records
    assert record.prompt == ({"role": "user", "content": "hi"},) and record.answer == "42"


def test_parquet_directory_files_must_agree(tmp_path):
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"problem": ["p"]}), tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match="b.parquet.*same columns"):
        load_records(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Fields and values
# --------------------------------------------------------------------------------------------------------------


def test_field_precedence_is_per_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    # "prompt" appears only on line 2 but outranks "question" for the whole file; "answer" outranks "solution".
    write_jsonl(path, [{"question": "q0", "solution": "s0"},
                       {"question": "q1", "prompt": "p1", "answer": "a1", "solution": "s1"}])
    loaded = load_records(path)
    assert (loaded.prompt_field, loaded.answer_field) == ("prompt", "answer")
    assert [(r.prompt, r.answer) for r in loaded.records] == [("p1", "a1")]
    assert loaded.num_skipped_empty == 1  # line 1 has no "prompt"


def test_numbers_as_answers(tmp_path):
    path = tmp_path / "n.jsonl"
    write_jsonl(path, [{"question": "a", "answer": 12}, {"question": "b", "answer": 0.5},
                       {"question": "c", "answer": "2020-01-01"}, {"question": "d", "answer": -3}])
    assert [r.answer for r in load_records(path).records] == ["12", "0.5", "2020-01-01", "-3"]
    table = pa.table({"question": ["a", "b"], "answer": pa.array([7, None], pa.int64())})
    pq.write_table(table, tmp_path / "n.parquet")
    assert [r.answer for r in load_records(tmp_path / "n.parquet").records] == ["7", None]


def test_empty_prompts_are_skipped_and_counted(tmp_path):
    path = tmp_path / "e.jsonl"
    write_jsonl(path, [{"prompt": "keep"}, {"prompt": ""}, {"prompt": "   "}, {"prompt": None}, {"other": 1}, "",
                       {"prompt": "keep too"}])
    loaded = load_records(path)
    assert [r.prompt for r in loaded.records] == ["keep", "keep too"]
    assert [r.source for r in loaded.records] == ["e.jsonl:1", "e.jsonl:7"]  # the blank line 6 is not a row
    assert loaded.num_skipped_empty == 4

    chat = tmp_path / "c.jsonl"
    write_jsonl(chat, [{"messages": []}, {"messages": None}, {"messages": [{"role": "assistant", "content": "x"}]},
                       {"messages": [{"role": "user", "content": "u"}]}])
    loaded = load_records(chat)
    assert len(loaded.records) == 1 and loaded.num_skipped_empty == 3

    pq.write_table(pa.table({"question": ["q", None, ""]}), tmp_path / "e.parquet")
    loaded = load_records(tmp_path / "e.parquet")
    assert len(loaded.records) == 1 and loaded.num_skipped_empty == 2


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c" "answer": 1}', {"prompt": "d"}])
    with pytest.raises(DatasetError) as info:
        load_records(path)
    message = str(info.value)
    assert "bad.jsonl:3:" in message and "not valid JSON" in message and "fix or remove the line" in message
    assert "\n" not in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    write_jsonl(path, [{"prompt": "a"}, ["not", "an", "object"]])
    with pytest.raises(DatasetError, match=r"list\.jsonl:2: a JSON list, not an object"):
        load_records(path)


def test_no_prompt_field_names_found_and_accepted(tmp_path):
    path = tmp_path / "np.jsonl"
    write_jsonl(path, [{"text": "a", "label": 1}])
    with pytest.raises(DatasetError) as info:
        load_records(path)
    message = str(info.value)
    assert "no prompt field" in message and "'label', 'text'" in message
    assert all(field in message for field in PROMPT_FIELDS)

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "np.parquet")
    with pytest.raises(DatasetError, match=r"np\.parquet: no prompt field; found \['text'\]"):
        load_records(tmp_path / "np.parquet")


def test_wrong_value_types(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"prompt": ["a"]}])
    with pytest.raises(DatasetError, match=r"t\.jsonl:1: 'prompt' is a list, expected a string"):
        load_records(path)
    write_jsonl(path, [{"prompt": "a", "answer": {"x": 1}}])
    with pytest.raises(DatasetError, match=r"t\.jsonl:1: 'answer' is a dict"):
        load_records(path)
    write_jsonl(path, [{"messages": [{"role": "user"}]}])
    with pytest.raises(DatasetError, match=r"t\.jsonl:1: messages\[0\] is not"):
        load_records(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="empty.jsonl: dataset has no rows"):
        load_records(path)


def test_all_rows_empty_or_no_rows_in_parquet(tmp_path):
    path = tmp_path / "blank.jsonl"
    write_jsonl(path, [{"prompt": ""}, {"prompt": None}])
    with pytest.raises(DatasetError, match="2 rows, all with an empty 'prompt'"):
        load_records(path)
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), tmp_path / "zero.parquet")
    with pytest.raises(DatasetError, match="dataset has no rows"):
        load_records(tmp_path / "zero.parquet")


def test_missing_path_bad_extension_empty_directory_bad_parquet(tmp_path):
    with pytest.raises(DatasetError, match="nope.jsonl: no such file or directory"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("prompt\na\n")
    with pytest.raises(DatasetError, match=r"unsupported extension '\.csv'; convert it to \.jsonl"):
        load_records(tmp_path / "data.csv")
    empty_dir = tmp_path / "shards"
    empty_dir.mkdir()
    (empty_dir / "x.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match="directory has no \\*.parquet files"):
        load_records(empty_dir)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="junk.parquet: not a readable parquet file"):
        load_records(tmp_path / "junk.parquet")


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


# --------------------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------------------


def _records(n: int) -> list[PromptRecord]:
    return [PromptRecord(prompt=f"p{i}", answer=str(i), source=f"x.jsonl:{i + 1}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete():
    records = _records(50)
    train, held_out = split_records(records, num_eval=10, seed=3)
    assert len(held_out) == 10 and len(train) == 40
    assert {r.source for r in train}.isdisjoint({r.source for r in held_out})
    assert sorted(train + held_out, key=lambda r: int(r.answer)) == records
    again = split_records(records, num_eval=10, seed=3)
    assert again == (train, held_out) and again.train == train and again.eval == held_out
    other = split_records(records, num_eval=10, seed=4)
    assert other.eval != held_out
    assert [r.prompt for r in records] == [f"p{i}" for i in range(50)]  # the input is not shuffled in place


@pytest.mark.parametrize("num_eval", [5, 6, -1])
def test_split_needs_training_records(num_eval):
    with pytest.raises(DatasetError, match=f"num_eval={num_eval} must be in \\[0, 5\\)"):
        split_records(_records(5), num_eval=num_eval, seed=0)


def test_split_with_no_eval():
    train, held_out = split_records(_records(5), num_eval=0, seed=0)
    assert len(train) == 5 and held_out == []


# --------------------------------------------------------------------------------------------------------------
# The shipped prompt set
# --------------------------------------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expression: str) -> int:
    """Integer arithmetic with + - * and parentheses only."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise AssertionError(f"unexpected {ast.dump(node)} in {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def test_shipped_arithmetic_prompts(root):
    path = root / "data" / "arithmetic_prompts.jsonl"
    loaded = load_records(path)
    assert (loaded.prompt_field, loaded.answer_field, loaded.num_skipped_empty) == ("question", "answer", 0)
    assert len(loaded.records) == 300
    assert len({r.prompt for r in loaded.records}) == 300
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ops_seen = set()
    for record, row in zip(loaded.records, rows, strict=True):
        assert record.prompt == row["question"] and record.answer == row["answer"]
        assert re.fullmatch(r"\d+", record.answer), record
        # The answer is the arithmetic of the question: the expression's numbers are the question's numbers.
        assert int(record.answer) == _evaluate(row["expression"]), row
        assert re.findall(r"\d+", row["expression"]) == re.findall(r"\d+", record.prompt), row
        assert record.prompt.endswith("Put the final answer in \\boxed{}.")
        assert len(record.prompt.split()) <= 30  # well under 60 tokens
        ops_seen.add(tuple(sorted(set(re.findall(r"[-+*]", row["expression"])))))
    assert {("+",), ("-",), ("*",), ("+", "-"), ("*", "-"), ("*", "+")} <= ops_seen


def test_shipped_arithmetic_prompts_are_the_scripts_output(root):
    spec = importlib.util.spec_from_file_location("make_arithmetic_prompts",
                                                  root / "scripts" / "make_arithmetic_prompts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    committed = (root / "data" / "arithmetic_prompts.jsonl").read_text(encoding="utf-8")
    assert script.to_jsonl(script.make_prompts()) == committed, "rerun scripts/make_arithmetic_prompts.py"
