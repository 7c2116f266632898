"""Stories from text, JSON Lines or JSON files: what `llama2 data prepare`, `llama2 tokenizer train`
and `llama2 eval` read. Text is strict UTF-8; a bad byte or record is an error naming the file and place.
"""

import codecs
import io
import json
import re
from pathlib import Path

from ..errors import Llama2Error

STORY_SEPARATOR = "<|endoftext|>"  # TinyStories' text files
BLANK_LINES = "blank"  # --separator value: records are separated by blank lines
TEXT_FIELD = "text"
CHUNK_BYTES = 1 << 22


def _decode_chunks(path, advance):
    """Yield text of a file decoded as strict UTF-8 in chunks, newlines normalized to "\\n"."""
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            final = not chunk
            pending = len(utf8.getstate()[0])
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                raise Llama2Error(f"{path}: invalid UTF-8 at byte {offset - pending + e.start}") from None
            offset += len(chunk)
            advance(len(chunk))
            if text:
                yield text
            if final:
                return


def _split_text(path, separator, advance):
    """Records of a text file separated by `separator` (or by blank lines), stripped, empty dropped."""
    if separator == BLANK_LINES:
        pattern = re.compile(r"\n[ \t]*\n")
        split = pattern.split
    else:
        def split(text):
            return text.split(separator)
    tail = ""
    for text in _decode_chunks(path, advance):
        parts = split(tail + text)
        tail = parts.pop()
        yield from parts
    yield tail


def _record_text(record, text_field, where):
    if not isinstance(record, dict):
        raise Llama2Error(f"{where}: expected a JSON object with a {text_field!r} field, "
                          f"got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(map(str, list(record)[:8])) or "none"
        raise Llama2Error(f"{where}: record has no {text_field!r} field (fields: {fields}); "
                          f"choose one with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise Llama2Error(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def _jsonl(path, text_field, advance):
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            advance(len(line))
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise Llama2Error(f"{path}:{lineno}: invalid UTF-8 at column {e.start + 1}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise Llama2Error(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
            yield _record_text(record, text_field, f"{path}:{lineno}")


def _json(path, text_field, advance):
    raw = Path(path).read_bytes()
    advance(len(raw))
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Llama2Error(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise Llama2Error(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(records, list):
        raise Llama2Error(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        yield _record_text(record, text_field, f"{path}: record {i}")


def read_stories(path, separator=None, text_field=None, advance=lambda n: None):
    """Yield the stories of one file, stripped: `.jsonl` / `.json` records' `text_field`, any other
    file as UTF-8 text split on `separator` ("<|endoftext|>" by default, "blank" for blank lines)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise Llama2Error(f"{path}: no such file") from None
    if path.is_dir():
        raise Llama2Error(f"{path}: is a directory, expected a text, .jsonl or .json file")
    if size == 0:
        raise Llama2Error(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl(path, text_field or TEXT_FIELD, advance)
    elif suffix == ".json":
        records = _json(path, text_field or TEXT_FIELD, advance)
    else:
        records = _split_text(path, separator or STORY_SEPARATOR, advance)
    count = 0
    try:
        for text in records:
            text = text.strip()
            if text:
                count += 1
                yield text
    except PermissionError:
        raise Llama2Error(f"{path}: permission denied") from None
    if count == 0:
        raise Llama2Error(f"{path}: no stories found (only whitespace or separators)")


def progress_bar(total, desc, progress):
    from tqdm import tqdm
    # progress=None: show the bar only on a terminal
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if progress is None
                else not progress, leave=False, dynamic_ncols=True)


def read_inputs(inputs, separator=None, text_field=None, progress=None):
    """The stories of several files in order, with a progress bar over their bytes."""
    paths = [Path(p) for p in inputs]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    with progress_bar(total, "reading", progress) as bar:
        for path in paths:
            yield from read_stories(path, separator, text_field, bar.update)
