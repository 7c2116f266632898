"""The CLI in-process: flags as run.c takes them, exit codes, one-line errors, chat over stdin."""

import io
import os
import subprocess
import sys

import pytest

from conftest import REPO, asset
from llama2.cli import main


def run_cli(argv, stdin=""):
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def story(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLAMA2_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAMA2_OFFLINE", "1")
    return [str(asset("stories260K.bin")), "-z", str(asset("tok512.bin"))]


@pytest.mark.parametrize("flags,message", [
    (["-t", "-1"], "-t -1.0: temperature must be >= 0"),
    (["-t", "nan"], "-t nan: temperature must be a finite number >= 0"),
    (["-t", "inf"], "-t inf: temperature must be a finite number >= 0"),
    (["-p", "nan"], "-p nan: top-p must be in [0, 1]"),
    (["-p", "1.5"], "-p 1.5: top-p must be in [0, 1]"),
    (["-n", "-3"], "-n -3: steps must be >= 0"),
    (["-t"], "expected one argument"),
    (["-t", "hot"], "invalid float value"),
    (["--mode", "sing"], "invalid choice"),
    (["-x", "1"], "unrecognized arguments"),
])
def test_bad_flags_exit_2_with_one_line(story, flags, message):
    code, out, err = run_cli(["run", *story, *flags])
    assert code == 2 and out == b""
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("temperature", ["1e-38", "1e-45"])
@pytest.mark.parametrize("top_p", ["0.9", "1"])
def test_tiny_temperature_is_greedy(story, temperature, top_p):
    """Issue 13, case 4: -t 1e-38 ended in an IndexError, and with -p 1 printed <unk> repeatedly."""
    code, greedy, _ = run_cli(["run", *story, "-t", "0", "-n", "16", "-i", "Lily"])
    assert code == 0
    code, out, err = run_cli(["run", *story, "-t", temperature, "-p", top_p, "-n", "16", "-i", "Lily"])
    assert code == 0 and out == greedy and b"<unk>" not in out, err


def test_m_takes_a_mode_or_a_model(story):
    model, _, tok = story
    greedy = ["-t", "0", "-n", "20"]
    code, by_flag, _ = run_cli(["run", "-m", model, "-z", tok, *greedy, "Lily"])
    assert code == 0
    code, positional, _ = run_cli(["run", model, "-z", tok, *greedy, "-i", "Lily"])
    assert code == 0 and by_flag == positional and by_flag.startswith(b"Lily")
    code, same, _ = run_cli(["run", model, "-z", tok, *greedy, "-i", "Lily", "-m", "generate"])
    assert same == by_flag


@pytest.mark.parametrize("argv,model,prompt", [
    ([], "stories15M.bin", "Once upon a time"),
    (["Long long ago"], "stories15M.bin", "Long long ago"),
    (["-m", "stories42M.bin", "Long long ago"], "stories42M.bin", "Long long ago"),
    (["stories42M.bin"], "stories42M.bin", ""),  # run.c style: the prompt defaults to empty
    (["x.bin", "-i", "Hey", "-m", "chat"], "x.bin", "Hey"),
    (["x.bin", "Hey there"], "x.bin", "Hey there"),
])
def test_both_cli_styles(argv, model, prompt):
    from llama2.cli import build_parser
    from llama2.cli.run import parse
    got = parse(build_parser().parse_args(["run", *argv]))
    assert got[:2] == (model, prompt)


def test_missing_files_are_one_line_errors(story):
    code, out, err = run_cli(["run", "nope.bin", "-z", story[2]])
    assert code == 1 and err.count("\n") == 1 and "nope.bin: no such model file" in err
    code, out, err = run_cli(["run", story[0], "-z", "missing-tok.bin"])
    assert code == 1 and "missing-tok.bin: no such tokenizer file" in err
    code, out, err = run_cli(["run", story[0], "-z", str(asset("tokenizer.bin"))[:-4] + ".model"])
    assert code == 1 and err.count("\n") == 1


def test_default_model_offline_says_what_to_download(story, tmp_path):
    code, out, err = run_cli(["run"])
    assert code == 1 and err.count("\n") == 1
    assert "download https://huggingface.co/karpathy/tinyllamas/resolve/main/stories15M.bin" in err
    assert str(tmp_path / "home" / "stories15M.bin") in err
    assert not (tmp_path / "home" / "stories15M.bin.part").exists()


def test_cache_folder_is_searched(story, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "tok512.bin").write_bytes(asset("tok512.bin").read_bytes())
    code, out, err = run_cli(["run", story[0], "-z", "tok512.bin", "-t", "0", "-n", "10"])
    assert code == 0, err


def test_wrong_tokenizer_for_model(story):
    code, out, err = run_cli(["run", str(asset("rand-gqa-unshared.bin")), "-z", story[2]])
    assert code == 1 and "tokenizer has 512 tokens but the model's vocabulary has 32000" in err


def test_chat_over_piped_stdin(story, monkeypatch):
    from llama2.sampler import Sampler
    from llama2.tokenizer import Tokenizer
    tok = Tokenizer.load(asset("tok512.bin"))
    reply = tok.encode("Hi friend", bos=False)
    script = iter((reply + [2]) * 3)  # each assistant turn says "Hi friend", then EOS
    seen = []
    real_forward = None

    def scripted(self, logits):
        return next(script)

    monkeypatch.setattr(Sampler, "sample", scripted)
    from llama2.model import Transformer
    real_forward = Transformer.forward

    def spy(self, tokens, cache, slot=0, all_logits=False):
        seen.append(list(tokens))
        return real_forward(self, tokens, cache, slot, all_logits)

    monkeypatch.setattr(Transformer, "forward", spy)
    code, out, err = run_cli(["run", *story, "-m", "chat", "-n", "200"],
                             stdin="You are kind.\nHello there\nTell me a story\n")
    assert code == 0, err
    # run.c prints a reply's first piece with its leading space (" Hi"): it follows "[/INST]"
    assert out.decode() == ("Enter system prompt (optional): User: Assistant:  Hi friend\n"
                            "User: Assistant:  Hi friend\nUser: \n")
    first = tok.encode("[INST] <<SYS>>\nYou are kind.\n<</SYS>>\n\nHello there [/INST]")
    second = tok.encode("[INST] Tell me a story [/INST]")
    assert seen[0] == first
    assert seen[len(reply) + 1] == [2] + second  # the closing EOS is fed before the next turn


def test_chat_with_cli_prompts_and_context_limit(story):
    code, out, err = run_cli(["run", *story, "--mode", "chat", "-y", "Be brief.", "-i", "Hi", "-n", "40",
                              "-t", "0"])
    assert code == 0
    assert out.startswith(b"Assistant: ")
    assert "40-position limit" in err


def test_achieved_tok_s_goes_to_stderr(story):
    code, out, err = run_cli(["run", *story, "-t", "0", "-n", "40"])
    assert code == 0 and b"achieved" not in out and err.startswith("achieved tok/s: ")


def test_tokenize(story):
    code, out, _ = run_cli(["tokenize", "-z", story[2], "Once upon a time"])
    assert code == 0 and out.decode().split() == ["1", "403", "407", "261", "378"][:len(out.split())]
    code, out, _ = run_cli(["tokenize", "-z", story[2], "--no-bos", "--eos", "hi"])
    ids = out.decode().split()
    assert ids[0] != "1" and ids[-1] == "2"


def test_python_dash_m_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.run([sys.executable, "-m", "llama2", "run", str(asset("stories260K.bin")), "-z",
                        str(asset("tok512.bin")), "-t", "0", "-n", "12"], capture_output=True, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith(b"Once upon a time")
    p = subprocess.run([sys.executable, "-m", "llama2", "run", "-t", "x"], capture_output=True, env=env)
    assert p.returncode == 2 and b"Traceback" not in p.stderr and p.stderr.count(b"\n") == 1


def test_first_use_download_into_cache(tmp_path, monkeypatch):
    """A known file is fetched over HTTP into the cache folder (atomically), then found there."""
    import functools
    import http.server
    import threading

    from llama2 import hub

    served = tmp_path / "served"
    served.mkdir()
    (served / "tok512.bin").write_bytes(asset("tok512.bin").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("LLAMA2_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("LLAMA2_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setitem(hub.KNOWN_FILES, "tok512.bin", f"http://127.0.0.1:{httpd.server_port}/tok512.bin")
        monkeypatch.chdir(tmp_path)
        path = hub.resolve("tok512.bin", what="tokenizer")
        assert path == tmp_path / "home" / "tok512.bin"
        assert path.read_bytes() == asset("tok512.bin").read_bytes()
        assert not list((tmp_path / "home").glob("*.part"))
    finally:
        httpd.shutdown()
