"""Every snippet in README.md and docs/ runs as written.

- ``python`` blocks run against a real sidecar (gRPC + REST) over the official fake backend
  serving a 32x32x3 model named ``cnn``; the only change is the port (``:8600`` / ``:8601``
  become the test sidecar's ports, so parallel test runs cannot collide).
- ``sh`` blocks that talk to the sidecar's REST port (``curl``) run in bash the same way.
- Command lines of ``hashguard-sidecar`` and ``hashguard-serving`` in ``sh`` blocks are parsed
  by the real parsers: every flag must exist (``A|B|C`` placeholders: each choice), and every
  ``make`` target named must exist in the Makefile.
Blocks that need what a test cannot have (Docker, Kubernetes, a model trained by ``make``)
are covered by the flag and target checks only.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fake_sidecar import start_fake_sidecar
from sidecar.testing import FakeBackend, FakeModel

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(lang: str) -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for m in BLOCK.finditer(page.read_text()):
            if m.group(1) == lang:
                out.append((f"{page.relative_to(REPO)}:{page.read_text()[:m.start()].count(chr(10)) + 1}", m.group(2)))
    return out


def commands(body: str) -> list[list[str]]:
    """Simple commands of a shell block (continuation lines joined, comments dropped)."""
    text = body.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in lexer:
            if token and set(token) <= set(";&"):
                out.append(argv)
                argv = []
            else:
                argv.append(token)
        out.append(argv)
    return out


def test_the_pages_have_snippets():
    assert blocks("python") and blocks("sh")


@pytest.fixture
async def cnn_sidecar():
    server = await start_fake_sidecar(FakeBackend({"cnn": FakeModel()}))
    yield server
    await server.stop(0)


def on_test_ports(text: str, server) -> str:
    return text.replace("localhost:8600", f"127.0.0.1:{server.port}").replace(
        "localhost:8601", f"127.0.0.1:{server.rest.port}")


@pytest.mark.parametrize("where,body", blocks("python"), ids=[w for w, _ in blocks("python")])
async def test_python_snippet_runs(where, body, cnn_sidecar, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(on_test_ports(body, cnn_sidecar))
    proc = await _run([sys.executable, str(script)], tmp_path)
    assert proc[0] == 0, f"{where} failed:\n{proc[1]}"


CURL_BLOCKS = [(w, b) for w, b in blocks("sh") if "curl " in b]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("where,body", CURL_BLOCKS, ids=[w for w, _ in CURL_BLOCKS])
async def test_rest_snippet_runs(where, body, cnn_sidecar, tmp_path):
    code, out = await _run(["bash", "-euo", "pipefail", "-c", on_test_ports(body, cnn_sidecar)], tmp_path)
    assert code == 0, f"{where} failed:\n{out}"
    assert '"predictions"' in out and '"error"' not in out, f"{where}: {out}"


async def _run(argv: list[str], cwd: Path) -> tuple[int, str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(errors="replace")


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def _expand(argv: list[str]) -> list[list[str]]:
    """``--mode paper|hardened|off`` -> one command line per choice."""
    for i, a in enumerate(argv):
        if "|" in a and not a.startswith("--"):
            return [x for c in a.split("|") for x in _expand(argv[:i] + [c] + argv[i + 1:])]
    return [argv]


def test_documented_command_lines_parse():
    from serving.config import build_parser as serving_parser
    from sidecar.config import parser as sidecar_parser

    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    seen = {"hashguard-sidecar": 0, "hashguard-serving": 0, "make": 0}
    for where, body in blocks("sh"):
        for argv in commands(body):
            while argv and "=" in argv[0] and not argv[0].startswith("-"):
                argv = argv[1:]  # VAR=value prefixes
            if not argv:
                continue
            prog = argv[0]
            if prog == "make":
                seen[prog] += 1
                named = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
                assert set(named) <= targets, f"{where}: unknown make target(s) {set(named) - targets}"
            elif prog in ("hashguard-sidecar", "hashguard-serving") or argv[:3] == ["python", "-m", "serving"]:
                name = "hashguard-serving" if prog != "hashguard-sidecar" else prog
                seen[name] += 1
                ap = sidecar_parser() if name == "hashguard-sidecar" else serving_parser()
                known = {o for a in ap._actions for o in a.option_strings}
                for variant in _expand(argv):
                    unknown = set(_flags(variant)) - known
                    assert not unknown, f"{where}: {name} has no flag {sorted(unknown)}"
                    choices = {o: a.choices for a in ap._actions for o in a.option_strings if a.choices}
                    for i, a in enumerate(variant[:-1]):
                        if a in choices:
                            assert variant[i + 1] in choices[a], f"{where}: {a} {variant[i + 1]} is not a choice"
    assert all(seen.values()), f"the docs show no command line of some program: {seen}"
