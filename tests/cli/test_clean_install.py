"""A clean install (issue 10): `pip install` of the repository into a fresh venv builds the native
kernels there, and the first `llama2 run` of stories260K then loads them from the installed package
and prints run.c's golden story.

Tests never download: the fresh venv (made without pip) finds pip, setuptools and the dependencies
(numpy, ...) through a .pth line naming this interpreter's site-packages, after its own, and
installs the project from a copy of its files with --no-index --no-deps --no-build-isolation;
llama2 itself comes only from the fresh install (an editable install's .pth in those
site-packages is not processed: only the venv's own site dir is). This takes a minute (the extension's four
variants compile); it runs in CI like any other test.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

from conftest import GOLDEN, REPO, asset

pytestmark = pytest.mark.slow


def _copy_project(dest):
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info")
    shutil.copytree(REPO / "src", dest / "src", ignore=ignore)
    shutil.copytree(REPO / "native", dest / "native", ignore=ignore)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean-install")
    project = root / "project"
    project.mkdir()
    _copy_project(project)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    here = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if os.path.isdir(p)]
    with open(os.path.join(purelib, "zz_dependencies.pth"), "w") as f:  # after the venv's own packages
        f.write("\n".join(here) + "\n")
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        str(project)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return venv, root


def test_install_is_separate_from_the_checkout(fresh_venv):
    venv, _ = fresh_venv
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import llama2, llama2._native; "
                        "print(llama2.__file__); print(llama2._native.__file__)"],
                       capture_output=True, text=True, check=True, env=_env())
    for line in r.stdout.split():
        assert line.startswith(str(venv)), line  # the installed copy, with its compiled extension


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA2_ISA", "PYTHON"))}


def test_first_run_prints_the_golden_story(fresh_venv, tmp_path):
    venv, _ = fresh_venv
    case = json.loads((GOLDEN / "runc.jsonl").read_text().splitlines()[0]) if (GOLDEN / "runc.jsonl").exists() \
        else None
    if case is None or case["model"] != "stories260K.bin":
        pytest.skip("runc.jsonl's first case (stories260K) not found (set LLAMA2_GOLDEN)")
    r = subprocess.run([str(venv / "bin" / "python"), "-X", "importtime", "-m", "llama2", "run",
                        str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), *case["args"]],
                       capture_output=True, cwd=tmp_path, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout == bytes.fromhex(case["stdout_hex"])  # run.c's story, from the installed package
    imported = [line.split("|")[-1].strip() for line in r.stderr.decode().splitlines()
                if line.startswith("import time:")]
    assert "llama2._native" in imported and "llama2.model" in imported  # the installed kernels ran
