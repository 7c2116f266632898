"""Issue 19, case 7: odd files and arguments get one line, not a hang, a traceback or the memory.

Each odd file (/dev/zero, /dev/null, a FIFO, a symlink loop, a directory, a 10 GB sparse file) in
each role the CLI reads a file for (model, tokenizer, JSON schema, grammar, a model folder's chat
template and tokenizer): one line naming the file, exit 1 or 2, within DEADLINE_S, memory flat.
The CLI runs in-process, on a thread, so a hang fails the test instead of stopping the suite."""

import io
import json
import os
import resource
import struct
import threading
import time

import pytest

from conftest import asset
from llama2.cli import main

DEADLINE_S = 5  # the bound: an odd file is refused at once, not after reading it
GROWTH_LIMIT = 256 << 20  # bytes the process's peak memory may grow by during one case


def run_cli(argv):
    """main(argv) on a thread: (exit code, stdout, stderr, seconds); code None if still running."""
    out, err, result = io.BytesIO(), io.StringIO(), {}

    def target():
        result["code"] = main(argv, stdout=out, stderr=err, stdin=io.StringIO(""))
    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(DEADLINE_S)
    return result.get("code"), out.getvalue(), err.getvalue(), time.monotonic() - start


ODD = ["dev-zero", "dev-null", "fifo", "symlink-loop", "directory", "sparse-10gb"]


def odd_file(kind, folder, name="odd"):
    """An odd file called `name` in `folder`, of `kind`; its path."""
    device = {"dev-zero": "/dev/zero", "dev-null": "/dev/null"}.get(kind)
    if device and name == "odd":
        return device
    path = folder / name
    if device:  # inside a model folder: a link to the device
        path.symlink_to(device)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-loop":
        path.symlink_to(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "sparse-10gb":
        with open(path, "wb") as f:
            f.truncate(10 << 30)
    return path


def hf_folder(folder):
    """A Hugging Face folder that reads as far as its tokenizer and chat template: a valid
    config.json and a model.safetensors with an empty header (no tensor is read before them)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
        "max_position_embeddings": 64, "tie_word_embeddings": True}))
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    return folder


def roles(tmp_path, kind):
    """role -> (argv, the path the error must name)."""
    model, tok = str(asset("stories260K.bin")), str(asset("tok512.bin"))
    cases = {}
    for role, make in [
        ("model", lambda p: ["run", str(p), "-z", tok, "-n", "4"]),
        ("model -m", lambda p: ["run", "-m", str(p), "-z", tok, "-n", "4", "Lily"]),
        ("serve model", lambda p: ["serve", str(p), "-z", tok, "--port", "0"]),
        ("tokenizer", lambda p: ["run", model, "-z", str(p), "-n", "4"]),
        ("json schema", lambda p: ["run", model, "-z", tok, "-n", "4", "--json-schema", str(p)]),
        ("grammar", lambda p: ["run", model, "-z", tok, "-n", "4", "--grammar", str(p)]),
    ]:
        folder = tmp_path / role.replace(" ", "-")
        folder.mkdir()
        path = odd_file(kind, folder)
        cases[role] = (make(path), str(path))
    for role, name in [("chat template", "chat_template.jinja"), ("hf tokenizer", "tokenizer.json")]:
        folder = hf_folder(tmp_path / role.replace(" ", "-"))
        path = odd_file(kind, folder, name)
        cases[role] = (["run", str(folder), "-n", "4", "--mode", "chat", "-y", "", "-i", "hi"], str(path))
    return cases


@pytest.mark.parametrize("kind", ODD)
def test_odd_files_in_every_role(tmp_path, kind):
    for role, (argv, path) in roles(tmp_path, kind).items():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        code, out, err, seconds = run_cli(argv)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
        assert code is not None, f"{kind} as {role}: still running after {DEADLINE_S} s"
        assert code in (1, 2) and out == b"", (kind, role, code, err)
        assert err.count("\n") == 1 and err.startswith("llama2: error: ") and path in err, (kind, role, err)
        assert "Traceback" not in err and seconds < DEADLINE_S
        assert grown < GROWTH_LIMIT, f"{kind} as {role}: peak memory grew by {grown >> 20} MB"


@pytest.mark.parametrize("kind,words", [
    ("dev-zero", "is a character device"), ("dev-null", "is a character device"),
    ("fifo", "is a FIFO"), ("symlink-loop", "Too many levels of symbolic links"),
    ("directory", "is a directory"), ("sparse-10gb", "more than a tokenizer file can be")])
def test_the_message_says_what_the_file_is(tmp_path, kind, words):
    path = odd_file(kind, tmp_path)
    if kind == "sparse-10gb":  # a plausible header: the size is what is wrong
        with open(path, "r+b") as f:
            f.write(struct.pack("<I", 16))
    # a tokenizer without the model's vocabulary size: bounded by MAX_TEXT_BYTES alone
    code, _, err, _ = run_cli(["tokenize", "-z", str(path), "hello"])
    assert code in (1, 2) and words in err and err.count("\n") == 1, err


@pytest.mark.parametrize("kind", ["dev-zero", "dev-null", "fifo"])
def test_an_odd_first_argument_is_a_model_not_a_prompt(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("LLAMA2_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAMA2_OFFLINE", "1")
    path = odd_file(kind, tmp_path)
    code, _, err, _ = run_cli(["run", str(path)])
    assert code == 1 and f"{path}: is a" in err and "cannot download" not in err, err


def test_a_sparse_tokenizer_with_the_model_vocabulary_is_refused_by_its_header(tmp_path):
    path = odd_file("sparse-10gb", tmp_path)
    code, _, err, _ = run_cli(["run", str(asset("stories260K.bin")), "-z", str(path), "-n", "4"])
    assert code == 1 and f"{path}: max_token_length at byte 0 is 0" in err, err


@pytest.mark.parametrize("argv", [["run", "-i", "a\udcffb"], ["run", "a\udcffb"],
                                  ["run", "-z", "tok\udcfe.bin", "x"], ["tokenize", "\udcc3("]])
def test_arguments_that_are_not_utf8_are_one_line(argv):
    """Python hands a non-UTF-8 argument over as surrogate escapes (`-i $'a\\xffb'`)."""
    code, out, err, _ = run_cli(argv)
    assert code == 2 and out == b"" and err.count("\n") == 1 and "not valid UTF-8" in err, err
    bad = next(a for a in argv if any("\udc80" <= c <= "\udcff" for c in a))
    assert os.fsencode(bad).decode("utf-8", "backslashreplace") in err


def test_a_stdin_line_that_is_not_utf8_is_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), LLAMA2_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "llama2", "run", str(asset("stories260K.bin")), "-z",
                        str(asset("tok512.bin")), "--mode", "chat", "-n", "8"],
                       input=b"\n" + b"a\xffb\n", capture_output=True, env=env, timeout=120)
    assert p.returncode == 2 and b"Traceback" not in p.stderr, p.stderr
    assert p.stderr.decode().endswith("llama2: error: stdin: a line is not valid UTF-8 text\n")


def test_running_out_of_memory_names_the_file_being_read(tmp_path):
    """With the address space capped (ulimit -v), reading a 60 MB schema fails; the line names that
    file, not the model."""
    import subprocess
    import sys

    from conftest import REPO
    schema = tmp_path / "big.json"
    schema.write_text('{"type": "string", "description": "' + "x" * (60 << 20) + '"}')
    script = ("import resource, sys; from llama2.fileio import read_user_text; "
              "from llama2.errors import Llama2Error; "
              "soft, hard = resource.getrlimit(resource.RLIMIT_AS); "
              "vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024; "
              "resource.setrlimit(resource.RLIMIT_AS, (vm + (40 << 20), hard));\n"
              "try:\n    read_user_text(sys.argv[1], 'JSON schema file')\n"
              "except Llama2Error as e:\n    print(e)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.run([sys.executable, "-c", script, str(schema)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.stdout.startswith(f"{schema}: ran out of memory while reading this JSON schema file"), (p.stdout, p.stderr)


@pytest.mark.parametrize("claim", ["metadata", "array", "strings"])
def test_a_gguf_header_that_claims_more_than_the_file_holds(tmp_path, claim):
    """A sparse 10 GB GGUF whose counts are huge: refused from the counts, not after hours of
    reading zeros (or a numpy error for a numeric array past the end)."""
    path = tmp_path / "huge.gguf"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 60 if claim == "metadata" else 1)
    if claim != "metadata":
        item = 6 if claim == "array" else 8  # float32, string
        head += struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, item, 1 << 60)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(10 << 30)
    code, out, err, _ = run_cli(["run", str(path), "-z", str(asset("tok512.bin")), "-n", "4"])
    assert code == 1 and err.count("\n") == 1 and f"{path}: " in err and "cannot fit" in err, err


@pytest.mark.parametrize("cut", ["inside", "length"])
def test_a_gguf_cut_inside_its_vocabulary(tmp_path, cut):
    """The vocabulary's strings (read in one loop, gguf._Reader.strings): a file that ends inside
    them, or a string whose length runs past the end, gets one line naming the file."""
    data = bytearray(asset("stories260K.gguf").read_bytes())
    at = data.find(b"\x05\x00\x00\x00\x00\x00\x00\x00<unk>")  # the first token's length and text
    assert at > 0
    if cut == "inside":
        data = data[:at + 4500]  # past the count check (512 strings of at least 8 bytes), before their end
    else:
        data[at:at + 8] = struct.pack("<Q", len(data))
    path = tmp_path / "cut.gguf"
    path.write_bytes(bytes(data))
    code, out, err, _ = run_cli(["run", str(path), "-n", "4"])
    assert code == 1 and err.count("\n") == 1 and f"{path}: " in err and "truncated GGUF" in err, err
