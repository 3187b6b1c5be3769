"""The docs' command blocks run as pasted, or are checked the way their marker says.

Every ```bash block of README.md, and of the paper-scale section that ``make reproduce``
puts in docs/reproduce.md (``longact/demo/paper_scale.md``), carries a marker on the
line above it:

- ``<!-- readme: run -->``: run as is by bash (``set -euo pipefail``) in a scratch folder
  whose ``.venv`` is this test's virtualenv;
- ``<!-- readme: cfg-job -->``: every ``longact-train`` command in it (also after
  ``ray job submit ... --``) is run with ``--cfg job``: Hydra composes the recipe and the
  overrides, checks every key, prints the job config and stops before anything starts;
- ``<!-- readme: dry-run -->``: every ``longact submit`` command in it is run with
  ``--dry-run``: the overrides are checked and the job spec built, no cluster reached;
- ``<!-- readme: illustrative, checked by PATH -->``: needs what this machine has not
  (a GPU, a Docker engine, a cluster); PATH names the test file that checks the same
  thing another way, and it must exist.

A block without a marker, or with an unknown one, fails the first test: the README
and the code cannot drift apart silently.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "longact" / "demo" / "paper_scale.md"]
BIN = Path(sys.executable).parent
MARK_RE = re.compile(r"<!-- readme: (run|cfg-job|dry-run|illustrative)(.*?)-->")


@dataclass
class Block:
    doc: str
    kind: str
    note: str
    text: str
    line: int  # of the opening fence

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def commands(self) -> list[str]:
        """Commands with their continuation lines joined, comments dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        out = []
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                out.append(line)
        return out


def doc_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```bash"):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = MARK_RE.search(lines[k]) if k >= 0 else None
            kind, note = (m.group(1), m.group(2).strip()) if m else ("", "")
            text = "\n".join(lines[i + 1 : j])
            blocks.append(Block(doc.name, kind, note, text, i + 1))
            i = j
        i += 1
    return blocks


BLOCKS = [b for doc in DOCS for b in doc_blocks(doc)]


def _of(kind: str) -> list[Block]:
    return [b for b in BLOCKS if b.kind == kind]


def _env() -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    env.pop("LONGACT_CONSOLE", None)  # the console a user sees
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_every_command_block_is_marked():
    assert len(BLOCKS) >= 10
    for b in BLOCKS:
        assert b.kind, f"{b.where}: a bash block without a `<!-- readme: ... -->` marker"
        if b.kind == "illustrative":
            m = re.search(r"checked by (\S+)", b.note)
            assert m, f"{b.where}: an illustrative block must say what checks it"
            assert (REPO / m.group(1)).exists(), f"{b.where}: {m.group(1)} is missing"
    assert _of("run") and _of("cfg-job") and _of("dry-run")


def test_scripts_in_illustrative_blocks_parse():
    scripts = {w for b in _of("illustrative") for w in re.findall(r"scripts/[\w.]+\.sh", b.text)}
    assert scripts, "the GPU check block names its scripts"
    for script in sorted(scripts):
        proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def _train_part(cmd: str) -> list[str] | None:
    """The ``longact-train ...`` part of a command, as arguments."""
    words = shlex.split(cmd)
    if "longact-train" not in words:
        return None
    return words[words.index("longact-train") :]


# Runs each argument list through `longact-train`'s own main() with `--cfg job`, in one
# process: importing verl costs ~7 s, a composition after it under 1 s.
COMPOSE_ALL = """
import contextlib, io, json, sys
from hydra.core.global_hydra import GlobalHydra
from longact.train import entry

results = []
for argv in json.load(sys.stdin):
    sys.argv, out, err, rc = argv, io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            entry.main()
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    GlobalHydra.instance().clear()
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()[-3000:]})
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def composed() -> dict[str, dict]:
    """Every cfg-job block's `longact-train` commands, composed with `--cfg job`."""
    commands = {}
    for block in _of("cfg-job"):
        for cmd in block.commands():
            args = _train_part(cmd)
            if args is not None:
                commands[cmd] = args if "--cfg" in args else [*args, "--cfg", "job"]
    proc = subprocess.run(
        [sys.executable, "-c", COMPOSE_ALL], input=json.dumps(list(commands.values())),
        capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(commands, json.loads(proc.stdout), strict=True))


@pytest.mark.parametrize("block", _of("cfg-job"), ids=lambda b: b.where)
def test_cluster_commands_compose(block, composed):
    found = 0
    for cmd in block.commands():
        if _train_part(cmd) is None:
            assert cmd.startswith(("export ", "ray job submit")), f"unchecked command: {cmd}"
            continue
        result = composed[cmd]
        assert result["rc"] == 0, f"{block.where}: {cmd}\n{result['stderr']}"
        assert "actor_rollout_ref:" in result["stdout"] and "longact:" in result["stdout"]
        found += 1
    assert found, f"{block.where}: no longact-train command"


@pytest.mark.parametrize("block", _of("dry-run"), ids=lambda b: b.where)
def test_submit_commands_build_their_job(block):
    found = 0
    for cmd in block.commands():
        words = shlex.split(cmd)
        env = _env()
        env.setdefault("WANDB_API_KEY", "placeholder")  # the README says the shell has one
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[:2] != ["longact", "submit"]:
            assert words[0] in ("export",), f"unchecked command: {cmd}"
            continue
        args = [str(BIN / "longact"), "submit", "--dry-run", *words[2:]]
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, f"{block.where}: {cmd}\n{proc.stderr[-3000:]}"
        assert '"entrypoint": "' in proc.stdout and "longact-train" in proc.stdout
        found += 1
    assert found, f"{block.where}: no longact submit command"


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("block", _of("run"), ids=lambda b: b.where)
def test_run_blocks_run_as_pasted(block, tmp_path):
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    log = tmp_path / "block.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.text],
            stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path, timeout=1400,
        )  # fmt: skip
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{block.where} exited {proc.returncode}:\n{out[-6000:]}"
    if "longact-train" in block.text:
        # the compact console: one line per step, no verl metric dict
        steps = re.findall(r"^step (\d+)/(\d+) ", out, flags=re.M)
        assert steps and steps[-1][0] == steps[-1][1], out[-4000:]
        assert "actor/pg_loss" not in out
        print(out)  # the console a newcomer sees, for the record (pytest -s)
