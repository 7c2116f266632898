"""Data preparation and tokenizer training (no torch): story readers, shards, one-line errors,
interrupted runs, the TinyStories download, and tokenizer.bin export."""

import contextlib
import http.server
import io
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import asset
from llama2.cli import main
from llama2.errors import Llama2Error
from llama2.train import data, stories

pytest.importorskip("sentencepiece")


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, out.getvalue(), err.getvalue()


def prepare_cli(tmp_path, *inputs, extra=()):
    return run_cli(["data", "prepare", *map(str, inputs), "--out", str(tmp_path / "data"),
                    "--tokenizer", str(asset("tok512.model")), "--workers", "1", *extra])


def one_line_error(code, err):
    assert code == 1, err
    assert err.startswith("llama2: error: ") and err.count("\n") == 1, err
    return err


# ---- readers -----------------------------------------------------------------------------------

def test_text_separator_and_blank_lines(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("One.\nTwo lines.<|endoftext|>\n  Second story.  \n<|endoftext|>\n\n<|endoftext|>Third\r\n")
    assert list(stories.read_stories(p)) == ["One.\nTwo lines.", "Second story.", "Third"]
    q = tmp_path / "b.txt"
    q.write_text("Para one.\n\nPara two\nstill two.\n \nThree.\n")
    assert list(stories.read_stories(q, separator="blank")) == ["Para one.", "Para two\nstill two.", "Three."]


def test_separator_across_chunk_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(stories, "CHUNK_BYTES", 7)
    p = tmp_path / "s.txt"
    p.write_text("alpha beta<|endoftext|>gamma delta é<|endoftext|>epsilon")
    assert list(stories.read_stories(p)) == ["alpha beta", "gamma delta é", "epsilon"]


def test_jsonl_and_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": " one "}\n\n{"text": "two", "x": 1}\n')
    assert list(stories.read_stories(tmp_path / "a.jsonl")) == ["one", "two"]
    (tmp_path / "b.json").write_text(json.dumps([{"story": "s1"}, {"story": "s2"}]))
    assert list(stories.read_stories(tmp_path / "b.json", text_field="story")) == ["s1", "s2"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"Good story.<|endoftext|>caf\xe9 bad", "bad.txt: invalid UTF-8 at byte 27"),
    ("empty.txt", b"", "empty.txt: file is empty"),
    ("blank.txt", b"\n  <|endoftext|>\n", "blank.txt: no stories found"),
    ("nofield.jsonl", b'{"text": "ok"}\n{"story": "x", "id": 3}\n',
     "nofield.jsonl:2: record has no 'text' field (fields: story, id)"),
    ("badjson.jsonl", b'{"text": "ok"}\n{"text": \n', "badjson.jsonl:2: invalid JSON"),
    ("badutf8.jsonl", b'{"text": "\xff"}\n', "badutf8.jsonl:1: invalid UTF-8"),
    ("notlist.json", b'{"text": "x"}', "notlist.json: expected a JSON array of records"),
    ("nofield.json", b'[{"text": "a"}, {"body": "b"}]', "nofield.json: record 1: record has no 'text'"),
])
def test_malformed_input_is_one_line_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    code, _, err = prepare_cli(tmp_path, tmp_path / name)
    assert message in one_line_error(code, err)
    assert not (tmp_path / "data" / data.META).exists()


def test_missing_file_and_bad_tokenizer(tmp_path):
    code, _, err = prepare_cli(tmp_path, tmp_path / "nope.txt")
    assert "nope.txt: no such file" in one_line_error(code, err)
    (tmp_path / "s.txt").write_text("story")
    (tmp_path / "tok.model").write_bytes(b"not a tokenizer at all")
    code, _, err = run_cli(["data", "prepare", str(tmp_path / "s.txt"), "--out", str(tmp_path / "d"),
                            "--tokenizer", str(tmp_path / "tok.model")])
    one_line_error(code, err)


# ---- shards ------------------------------------------------------------------------------------

def test_prepare_shards_split_and_bos(tmp_path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(asset("tok512.model")))
    stories = [f"Story number {i}. Tom saw a dog." for i in range(40)]
    src = tmp_path / "s.txt"
    src.write_text("<|endoftext|>".join(stories))
    code, _, err = prepare_cli(tmp_path, src, extra=["--val-fraction", "0.1", "--shard-tokens", "100",
                                                     "--eos"])
    assert code == 0, err
    td = data.TokenData(tmp_path / "data")
    assert td.meta["stories"] == {"train": 36, "val": 4}
    assert td.dtype == np.dtype("<u2") and td.vocab_size == 512
    train = np.concatenate(td.splits["train"]).tolist()
    val = np.concatenate(td.splits["val"]).tolist()
    expect = {"train": [], "val": []}
    for k, s in enumerate(stories):  # every 10th story (k = 9, 19, ...) is held out
        expect["val" if k % 10 == 9 else "train"] += [1] + sp.encode(s) + [2]
    assert train == expect["train"] and val == expect["val"]
    assert all(a.size == 100 for a in td.splits["train"][:-1]) and len(td.splits["train"]) > 2


def test_workers_do_not_change_output(tmp_path):
    src = asset("tinystories_train_sample_2MiB.txt")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        data.prepare([src], out, asset("tok512.model"), workers=workers, shard_tokens=300_000,
                     stories_per_task=100, val_fraction=0.02)
        outs.append(out)
    names = sorted(p.name for p in outs[0].glob("*.bin"))
    assert names == sorted(p.name for p in outs[1].glob("*.bin")) and len(names) >= 3
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_token_dtype():
    assert data.token_dtype(512) == np.uint16 and data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32


def test_interrupted_prepare_leaves_nothing_readable(tmp_path, monkeypatch):
    src = asset("tinystories_train_sample_2MiB.txt")
    out = tmp_path / "data"
    data.prepare([src], out, asset("tok512.model"), workers=1, shard_tokens=50_000)
    data.TokenData(out)  # a complete preparation reads fine

    real = data.read_stories

    def interrupted(*args, **kwargs):  # Ctrl-C after 600 stories: several shards already written
        for i, story in enumerate(real(*args, **kwargs)):
            if i == 600:
                raise KeyboardInterrupt
            yield story

    monkeypatch.setattr(data, "read_stories", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.prepare([src], out, asset("tok512.model"), workers=1, shard_tokens=50_000,
                     stories_per_task=50)
    assert not (out / data.META).exists()
    assert not list(out.glob(".*"))  # no temporary files left behind
    assert list(out.glob("train_*.bin"))  # shards that were finished stay, but are not data
    with pytest.raises(Llama2Error, match="interrupted"):
        data.TokenData(out)
    # a prepare killed outright leaves its temporary file; the next prepare removes it
    (out / ".train_0003.bin.abc123.part").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(data, "read_stories", real)
    data.prepare([src], out, asset("tok512.model"), workers=1, shard_tokens=50_000)
    assert not list(out.glob(".*"))
    # a shard cut short after the fact is caught by its size in meta.json
    shard = out / "train_0001.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(Llama2Error, match="train_0001.bin: shard is 1000 bytes"):
        data.TokenData(out)


def test_batches_are_windows_of_the_stream(tmp_path):
    arrays = [np.arange(0, 10, dtype=np.uint16), np.arange(10, 13, dtype=np.uint16),
              np.arange(13, 40, dtype=np.uint16)]
    b = data.Batches(arrays, seq_len=8, name="test")
    x, y = b.sample(50, seed=1, purpose=0, iteration=3, micro=1)
    assert x.shape == (50, 8) and x.dtype == np.int64
    assert (np.diff(x, axis=1) == 1).all() and (y == x + 1).all()  # windows straddle shards intact
    x2, _ = b.sample(50, seed=1, purpose=0, iteration=3, micro=1)
    x3, _ = b.sample(50, seed=1, purpose=0, iteration=3, micro=2)
    assert (x == x2).all() and not (x == x3).all()
    with pytest.raises(Llama2Error, match="fewer than max_seq_len"):
        data.Batches(arrays, seq_len=40, name="test")


# ---- TinyStories from the hub ------------------------------------------------------------------

def test_offline_hub_is_one_line_error(tmp_path):
    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = prepare_cli(tmp_path, "tinystories", extra=["--hub-url", f"http://127.0.0.1:{port}"])
    err = one_line_error(code, err)
    assert "cannot download roneneldan/TinyStories" in err
    assert "llama2 data prepare TinyStories-train.txt --val TinyStories-valid.txt" in err


def test_offline_mode_does_not_touch_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = prepare_cli(tmp_path, "tinystories", extra=["--cache-dir", str(tmp_path / "c")])
    assert "offline mode is set" in one_line_error(code, err)


@contextlib.contextmanager
def serve(root: Path):
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_tinystories_download(tmp_path):
    repo = tmp_path / "hub" / "datasets" / "roneneldan" / "TinyStories" / "resolve" / "main"
    repo.mkdir(parents=True)
    (repo / "TinyStories-train.txt").write_text("A cat sat.<|endoftext|>A dog ran.<|endoftext|>Fish.")
    (repo / "TinyStories-valid.txt").write_text("Birds sing.<|endoftext|>")
    with serve(tmp_path / "hub") as url:
        code, _, err = prepare_cli(tmp_path, "tinystories", extra=["--hub-url", url, "--cache-dir",
                                                                   str(tmp_path / "cache")])
    assert code == 0, err
    td = data.TokenData(tmp_path / "data")
    assert td.meta["stories"] == {"train": 3, "val": 1}  # the hub's own validation file
    assert (tmp_path / "cache" / "TinyStories-valid.txt").read_text() == "Birds sing.<|endoftext|>"


# ---- tokenizer training and export --------------------------------------------------------------

def test_export_matches_llama2c_tokenizer_bin(tmp_path):
    from llama2.train.tokenizer import export_bin
    export_bin(asset("tok512.model"), tmp_path / "tok.bin")
    assert (tmp_path / "tok.bin").read_bytes() == asset("tok512.bin").read_bytes()


def test_tokenizer_train_cli(tmp_path):
    import sentencepiece as spm
    from llama2.tokenizer import Tokenizer

    src = asset("tinystories_train_sample_2MiB.txt")
    code, _, err = run_cli(["tokenizer", "train", str(src), "--vocab-size", "384", "--out",
                            str(tmp_path / "tok384"), "--max-sentences", "20000"])
    assert code == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok384.model"))
    assert sp.vocab_size() == 384 and sp.IdToPiece(3) == "<0x00>"
    tok = Tokenizer.load(tmp_path / "tok384.bin")
    assert tok.vocab_size == 384
    text = "Lily and Ben found 12 red apples. \u00e9t\u00e9 \u2603"
    assert tok.encode(text, bos=True) == [1] + sp.encode(text)  # run.c's encoder agrees
    ascii_text = "Lily and Ben found 12 red apples."
    assert tok.decode(tok.encode(ascii_text, bos=True)[1:]) == ascii_text

    code, _, err = run_cli(["tokenizer", "train", str(src), "--vocab-size", "100", "--out",
                            str(tmp_path / "small")])
    assert "--vocab-size must be at least 262" in one_line_error(code, err)
    code, _, err = run_cli(["tokenizer", "train", str(src), "--vocab-size", "300", "--out",
                            str(tmp_path / "small"), "--max-sentences", "2000"])
    assert "Vocabulary size is smaller than required_chars" in one_line_error(code, err)
