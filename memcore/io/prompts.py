"""Conditions for extraction: prompts from ``.txt``/``.jsonl``/``.csv`` files, class ids from ``--classes``.

- ``.txt``: one prompt per line; surrounding whitespace is stripped and blank lines are skipped.
- ``.jsonl``: one JSON object per non-blank line; the prompt is the string field ``column``, by default the
  first of ``prompt``, ``text``, ``caption`` that the first record has (every record must then have it);
  blank values are skipped. A value must be Unicode text: an unpaired surrogate escape (``"\\ud800"``) is
  an error.
- ``.csv``: a header row; the prompt is the column ``column``, by default the first of ``prompt``, ``text``,
  ``caption`` in the header, or the only column; blank entries are skipped. The prompt column must appear
  once in the header. Fields are comma-separated: a lone header column holding tabs or semicolons is refused
  (read as one column, each row's other fields would join its prompt).

A line ends at ``\\n``, ``\\r\\n`` or ``\\r`` only (as ``wc -l``, Python's text files and the JSON Lines
format count them), not at the other characters :meth:`str.splitlines` breaks at: U+2028, U+2029, U+0085
(NEL) or a form feed inside a caption are part of the prompt.

Files must be UTF-8 (a leading byte-order mark is accepted); anything else is a ValueError naming the file
and the byte offset of the first bad byte. A file with no prompt is an error. Order is kept and duplicates
are kept (each line is one condition, as the user wrote it).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

DEFAULT_COLUMNS = ("prompt", "text", "caption")
PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")


def load_conditions(path: str | Path, *, column: str | None = None) -> list[str]:
    """Read prompts from a ``.txt``, ``.jsonl`` or ``.csv`` file (rules in the module docstring).

    Args:
        path: the prompt file.
        column: the JSONL field or CSV column holding the prompt; ``None`` picks the default (see above).
            Not allowed for ``.txt``.

    Returns:
        The prompts in file order, at least one.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"prompt file not found: {p}")
    if p.is_dir():
        raise ValueError(f"{p}: is a folder, expected a prompt file ({', '.join(PROMPT_SUFFIXES)})")
    suffix = p.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(
            f"{p}: unsupported prompt file type {p.suffix!r}; use one of {', '.join(PROMPT_SUFFIXES)}"
        )
    if column is not None and (not isinstance(column, str) or not column):
        raise ValueError(f"column must be a non-empty string, got {column!r}")
    text = _read_utf8(p)
    if suffix == ".txt":
        if column is not None:
            raise ValueError(f"{p}: a .txt prompt file has no columns (column={column!r} given)")
        prompts = [s for s in (line.strip() for line in _lines(text)) if s]
    elif suffix == ".jsonl":
        prompts = _read_jsonl(p, text, column)
    else:
        prompts = _read_csv(p, text, column)
    if not prompts:
        raise ValueError(f"{p}: no prompts in the file")
    return prompts


#: The most class ids a class list may name (an embedding table of more classes is not a diffusion UNet's).
MAX_CLASS_IDS = 1_000_000
# Digits a class id may have (ids that long cannot index an embedding table anyway).
_MAX_CLASS_DIGITS = 18


def parse_classes(spec: str, *, num_classes: int | None = None) -> list[int]:
    """Parse a class list such as ``"0,1,5-7"`` (ranges inclusive) into ``[0, 1, 5, 6, 7]``.

    Args:
        spec: comma-separated non-negative ints and ``a-b`` ranges with ``a <= b``; spaces are allowed.
        num_classes: when given, every id must be ``< num_classes``.

    Returns:
        The class ids in the order written. A class named twice is an error.
    """
    if not isinstance(spec, str):
        raise TypeError(f"classes must be a string such as '0,1,5-7', got {type(spec).__name__}")
    if not spec.strip():
        raise ValueError("empty class list; give class ids such as '0,1,5-7'")
    out: list[int] = []
    for part in spec.split(","):
        item = part.strip()
        m = re.fullmatch(r"([0-9]+)(?:\s*-\s*([0-9]+))?", item)  # ASCII digits: not "٣"
        if m is None:
            raise ValueError(f"bad class list {spec!r}: {item!r} is not a class id or a range a-b")
        if max(len(g) for g in m.groups("")) > _MAX_CLASS_DIGITS:
            # int() itself refuses more than 4300 digits, with a message about sys.set_int_max_str_digits
            raise ValueError(
                f"bad class list {spec!r}: {item!r} names a class id of more than {_MAX_CLASS_DIGITS} digits"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad class list {spec!r}: range {item!r} runs backwards")
        # bounds before the range is built: a typo such as 0-3000000000 must not fill the memory first
        if num_classes is not None and hi >= num_classes:
            raise ValueError(
                f"bad class list {spec!r}: class {max(lo, num_classes)} is out of range for {num_classes} classes"
            )
        if len(out) + hi - lo + 1 > MAX_CLASS_IDS:
            raise ValueError(f"bad class list {spec!r}: more than {MAX_CLASS_IDS:,} class ids")
        out.extend(range(lo, hi + 1))
    seen: set[int] = set()
    for c in out:
        if c in seen:
            raise ValueError(f"bad class list {spec!r}: class {c} is named twice")
        seen.add(c)
    return out


# --------------------------------------------------------------------------------------------- helpers


def check_text(s: str, where: str) -> None:
    """Refuse a string no UTF-8 writer can encode (a lone surrogate, as ``json.loads("\"\\ud800\"")`` gives):
    the results files and the conditions digest are UTF-8. ``where`` names the string in the error."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        cp = ord(s[exc.start])
        raise ValueError(
            f"{where} holds an unpaired surrogate (U+{cp:04X}), which is not Unicode text"
        ) from None


_NEWLINE = re.compile(r"\r\n|\r|\n")


def _lines(text: str) -> list[str]:
    """``text`` split at universal newlines only (str.splitlines also splits at U+2028, NEL, form feed...)."""
    lines = _NEWLINE.split(text)
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start another
    return lines


def _read_utf8(p: Path) -> str:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{p}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at byte offset {exc.start}); save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _read_jsonl(p: Path, text: str, column: str | None) -> list[str]:
    prompts: list[str] = []
    key = column
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: line {lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p}: line {lineno} is a JSON {type(rec).__name__}, expected an object")
        if key is None:
            key = next((k for k in DEFAULT_COLUMNS if k in rec), None)
            if key is None:
                raise ValueError(
                    f"{p}: line {lineno} has none of the fields {', '.join(DEFAULT_COLUMNS)} "
                    f"(fields: {', '.join(map(str, rec)) or 'none'}); name the field with column="
                )
        if key not in rec:
            raise ValueError(f"{p}: line {lineno} has no field {key!r}")
        value = rec[key]
        if not isinstance(value, str):
            raise ValueError(
                f"{p}: line {lineno}: field {key!r} is a {type(value).__name__}, expected a string"
            )
        # json.loads turns a "\ud800" escape into a lone surrogate: refused here, not mid-run
        check_text(value, f"{p}: line {lineno}: field {key!r}")
        value = value.strip()
        if value:
            prompts.append(value)
    return prompts


def _read_csv(p: Path, text: str, column: str | None) -> list[str]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise ValueError(f"{p}: the CSV file has no header row")
        header = [h.strip() for h in header]
        if column is not None:
            if column not in header:
                raise ValueError(f"{p}: no column {column!r} (columns: {', '.join(header)})")
            key = column
        else:
            key = next((k for k in DEFAULT_COLUMNS if k in header), None)
            if key is None:
                if len(header) == 1 and ("\t" in header[0] or ";" in header[0]):
                    # read as one column, every row's other fields would become part of its prompt
                    sep = "tab" if "\t" in header[0] else "semicolon"
                    raise ValueError(
                        f"{p}: the header is one {sep}-separated column {header[0]!r}: a .csv prompt file "
                        "is comma-separated; convert it, or write the prompts as .txt or .jsonl"
                    )
                if len(header) != 1:
                    raise ValueError(
                        f"{p}: none of the columns {', '.join(DEFAULT_COLUMNS)} (columns: "
                        f"{', '.join(header)}); name the column with column="
                    )
                key = header[0]
        if header.count(key) > 1:  # which of them holds the prompts is a guess either way
            raise ValueError(f"{p}: the header names the column {key!r} {header.count(key)} times")
        idx = header.index(key)
        prompts = []
        for row in reader:
            if not row or not any(v.strip() for v in row):
                continue  # blank line
            if len(row) != len(header):
                raise ValueError(
                    f"{p}: line {reader.line_num} has {len(row)} fields but the header has {len(header)}"
                )
            value = row[idx].strip()
            if "\n" in value or "\r" in value:
                # legal CSV, but in a prompt file it is nearly always an unbalanced quote that swallowed the
                # rows after it into one prompt
                raise ValueError(
                    f"{p}: the prompt ending at line {reader.line_num} spans several lines (an unbalanced "
                    'quote?); write one prompt per row, "" for a quote inside a quoted field'
                )
            if value:
                prompts.append(value)
    except csv.Error as exc:
        if "field limit" in str(
            exc
        ):  # no caption is that long: a quote left open has swallowed the rows after it
            raise ValueError(
                f"{p}: a field past line {reader.line_num} is over {csv.field_size_limit():,} characters (an "
                'unbalanced quote?); write one prompt per row, "" for a quote inside a quoted field'
            ) from None
        raise ValueError(f"{p}: malformed CSV at line {reader.line_num} ({exc})") from None
    return prompts
