"""Prompt files and class lists: every form and every error."""

from __future__ import annotations

import json

import pytest

from memcore.io.prompts import load_conditions, parse_classes


def test_txt(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n\n   \n  a dog on a sofa  \r\nAnn Graham Lotz\n", encoding="utf-8")
    assert load_conditions(p) == ["a cat", "a dog on a sofa", "Ann Graham Lotz"]
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffcafé\n".encode())
    assert load_conditions(bom) == ["café"]
    with pytest.raises(ValueError, match="no columns"):
        load_conditions(p, column="prompt")


def test_non_utf8_names_offset(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"ok line\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin\.txt.*UTF-8.*byte offset 11"):
        load_conditions(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty(tmp_path, content):
    p = tmp_path / "e.txt"
    p.write_text(content)
    with pytest.raises(ValueError, match="no prompts"):
        load_conditions(p)


def test_missing_dir_and_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_conditions(tmp_path / "none.txt")
    with pytest.raises(ValueError, match="folder"):
        load_conditions(tmp_path)
    (tmp_path / "p.yaml").write_text("a")
    with pytest.raises(ValueError, match="unsupported"):
        load_conditions(tmp_path / "p.yaml")


def test_jsonl(tmp_path):
    p = tmp_path / "p.jsonl"
    recs = [{"caption": "x one", "id": 1}, {"caption": "x two", "id": 2}]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_conditions(p) == ["x one", "x two"]
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"prompt": "p", "text": "t", "mine": "m"}) + "\n")
    assert load_conditions(q) == ["p"]  # prompt before text before caption
    assert load_conditions(q, column="mine") == ["m"]
    with pytest.raises(ValueError, match="no field 'other'"):
        load_conditions(q, column="other")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
        ('["a"]\n', "line 1 is a JSON list"),
        ('{"prompt": "a"}\n{"text": "b"}\n', "line 2 has no field 'prompt'"),
        ('{"prompt": 3}\n', "field 'prompt' is a int"),
        ('{"name": "a"}\n', "none of the fields"),
    ],
)
def test_jsonl_errors(tmp_path, content, match):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_conditions(p)


def test_csv(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('id,caption\n1,"a, quoted, prompt"\n2,\n\n3,second\n', encoding="utf-8")
    assert load_conditions(p) == ["a, quoted, prompt", "second"]
    assert load_conditions(p, column="id") == ["1", "2", "3"]
    one = tmp_path / "one.csv"
    one.write_text("words\nhello\n")
    assert load_conditions(one) == ["hello"]
    with pytest.raises(ValueError, match=r"no column 'x' \(columns: id, caption\)"):
        load_conditions(p, column="x")
    two = tmp_path / "two.csv"
    two.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="name the column"):
        load_conditions(two)
    ragged = tmp_path / "r.csv"
    ragged.write_text("id,prompt\n1,a\n2,b,extra\n")
    with pytest.raises(ValueError, match="line 3 has 3 fields"):
        load_conditions(ragged)
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="no header"):
        load_conditions(empty)
    hdr = tmp_path / "h.csv"
    hdr.write_text("prompt\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_conditions(hdr)
    # an unbalanced quote swallowed the rows after it into one prompt
    quote = tmp_path / "q.csv"
    quote.write_text('prompt\n"a cat\nb dog\nc horse\n')
    with pytest.raises(ValueError, match=r"ending at line 4 spans several lines \(an unbalanced quote\?\)"):
        load_conditions(quote)


def test_parse_classes():
    assert parse_classes("0,1,5-7") == [0, 1, 5, 6, 7]
    assert parse_classes(" 3 , 9 - 9 ") == [3, 9]
    assert parse_classes("2", num_classes=10) == [2]
    for bad, match in [
        ("", "empty"),
        ("1,,2", "not a class id"),
        ("a", "not a class id"),
        ("-1", "not a class id"),
        ("7-5", "backwards"),
        ("1,1", "named twice"),
        ("0-2,2", "named twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_classes(bad)
    with pytest.raises(ValueError, match="out of range for 10"):
        parse_classes("3,10", num_classes=10)
    with pytest.raises(ValueError, match="class 10 is out of range for 10"):
        parse_classes("5-12", num_classes=10)
    # a typo naming billions of classes is refused before the range is built (it used to fill the memory)
    with pytest.raises(ValueError, match="class 10 is out of range for 10"):
        parse_classes("0-3000000000", num_classes=10)
    with pytest.raises(ValueError, match="more than 1,000,000 class ids"):
        parse_classes("0-3000000000")
    assert len(parse_classes("0-999999")) == 1_000_000
    with pytest.raises(ValueError, match="is not a class id"):
        parse_classes("\u0663")  # ARABIC-INDIC DIGIT THREE: \d matched it, int() read it as 3
    with pytest.raises(TypeError):
        parse_classes([1, 2])  # type: ignore[arg-type]


def test_lines_end_at_newlines_only(tmp_path):
    # str.splitlines also splits at U+2028, U+2029, NEL and form feed: a caption holding one became two
    # prompts in a .txt, and a valid JSON Lines file (json.dumps(ensure_ascii=False) writes them raw) failed
    # as "not valid JSON"
    p = tmp_path / "p.txt"
    p.write_text("a cat\u2028on a mat\nthe\x85dog\r\nform\x0cfeed\rlast", encoding="utf-8")
    assert load_conditions(p) == ["a cat\u2028on a mat", "the\x85dog", "form\x0cfeed", "last"]
    q = tmp_path / "q.jsonl"
    recs = [{"prompt": "a\u2028b"}, {"prompt": "c\x85d\u2029e"}, {"prompt": "f"}]
    q.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert load_conditions(q) == ["a\u2028b", "c\x85d\u2029e", "f"]
    r = tmp_path / "r.jsonl"
    r.write_text('{"prompt": "a"}\r\n\r\n{"prompt": 3}\r\n')
    with pytest.raises(ValueError, match="line 3: field 'prompt' is a int"):
        load_conditions(r)


def test_jsonl_unpaired_surrogate(tmp_path):
    # json.loads reads "\ud800" as a lone surrogate, which no UTF-8 writer can encode: the run failed later
    # with a UnicodeEncodeError naming neither file nor line
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok \\ud83d\\ude00"}\n{"prompt": "bad \\ud800"}\n')
    with pytest.raises(ValueError, match=r"line 2: field 'prompt' holds an unpaired surrogate \(U\+D800\)"):
        load_conditions(p)
    p.write_text('{"prompt": "ok \\ud83d\\ude00"}\n')
    assert load_conditions(p) == ["ok \U0001f600"]


def test_csv_prompt_column_named_twice(tmp_path):
    # the first of two "prompt" columns was taken silently
    p = tmp_path / "p.csv"
    p.write_text("prompt,id,prompt\na,1,b\n")
    with pytest.raises(ValueError, match="names the column 'prompt' 2 times"):
        load_conditions(p)
    with pytest.raises(ValueError, match="names the column 'prompt' 2 times"):
        load_conditions(p, column="prompt")
    assert load_conditions(p, column="id") == ["1"]


def test_csv_of_another_separator_is_refused(tmp_path):
    # a tab-separated file read as one column made "a cat\t42" the prompt of its first row
    p = tmp_path / "p.csv"
    p.write_text("prompt\tseed\na cat\t42\n")
    with pytest.raises(ValueError, match=r"one tab-separated column 'prompt\\tseed'.*comma-separated"):
        load_conditions(p)
    p.write_text("prompt;seed\na cat;42\n")
    with pytest.raises(ValueError, match="one semicolon-separated column"):
        load_conditions(p)
    p.write_text("caption\na cat; a dog\n")  # a separator inside a prompt is the prompt's
    assert load_conditions(p) == ["a cat; a dog"]


def test_csv_field_over_the_limit_names_the_likely_cause(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('prompt\n"an open quote\n' + "x" * 140_000 + "\n")
    with pytest.raises(ValueError, match=r"over 131,072 characters \(an unbalanced quote\?\)"):
        load_conditions(p)


def test_parse_classes_too_many_digits():
    # int() refused more than 4300 digits with a message about sys.set_int_max_str_digits, naming no input
    with pytest.raises(ValueError, match=r"bad class list.*more than 18 digits"):
        parse_classes("9" * 5000)
    with pytest.raises(ValueError, match="more than 18 digits"):
        parse_classes("1-" + "9" * 19)
    assert parse_classes("0" * 18) == [0]
