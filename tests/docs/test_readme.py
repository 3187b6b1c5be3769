"""The docs' command blocks run as pasted, or are checked the way their marker says.

Every ```bash block of README.md, and of the paper-scale section that ``make reproduce``
puts in docs/reproduce.md (``longact/demo/paper_scale.md``), parses with ``bash -n`` and
carries a marker on the line above it:

- ``<!-- readme: run -->``: run as is by bash (``set -euo pipefail``) in a scratch folder
  whose ``.venv`` is this test's virtualenv;
- ``<!-- readme: cfg-job -->``: every ``longact-train`` command in it (also after
  ``ray job submit ... --``) is run with ``--cfg job``: Hydra composes the recipe and the
  overrides, checks every key, prints the job config and stops before anything starts;
- ``<!-- readme: dry-run -->``: every ``longact submit`` command in it is run with
  ``--dry-run``: the overrides are checked and the job spec built, no cluster reached;
- ``<!-- readme: illustrative (WHY), checked by tests/P.py::test_a tests/Q.py::test_b
  [; unchecked: TOKEN ... (WHY)] -->``: needs what this machine has not (a GPU, a Docker
  engine, a cluster, the internet). Each named test must exist and not be marked skip
  or xfail, and each command of the block must be named in full by one of them: the
  variables it sets, its program and up to two subcommands (in a row, ``make demo``,
  when the command has no ``--option``), the repository files it names, every
  ``--option`` and the KEY of every ``KEY=VALUE`` must appear as words in the test's
  code: its function, and the module-level names and fixtures it uses, transitively
  (the ``run`` test's code includes the ``run`` blocks it runs). Every named test must
  name one command in full. ``unchecked:`` lists what no test here can check (a
  ``docker run`` option without a Docker engine): each token must be in the block and
  in none of its tests.

A block without a marker, or with an unknown one, fails the first test: the README
and the code cannot drift apart silently.
"""

from __future__ import annotations

import ast
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
    assert _of("run") and _of("cfg-job") and _of("dry-run") and _of("illustrative")


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_every_block_parses_as_bash(block):
    proc = subprocess.run(["bash", "-n", "-c", block.text], capture_output=True, text=True)
    assert proc.returncode == 0, f"{block.where}: {proc.stderr}"


def test_reproduce_report_ends_with_the_checked_paper_scale_section():
    """docs/reproduce.md carries paper_scale.md as ``make reproduce`` wrote it: its
    blocks are the ones checked here."""
    paper = (REPO / "longact" / "demo" / "paper_scale.md").read_text()
    assert (REPO / "docs" / "reproduce.md").read_text().endswith(paper)


# ---- illustrative blocks: the tests they name ------------------------------------------
NODE_RE = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")
RUN_TEST = "tests/docs/test_readme.py::test_run_blocks_run_as_pasted"


def claims(block: Block) -> tuple[list[str], set[str]]:
    """An illustrative marker's test node ids and its ``unchecked:`` tokens."""
    by = re.search(r"checked by ([^;]*)", block.note)
    nodes = ["::".join(m) for m in NODE_RE.findall(by.group(1))] if by else []
    waived = re.search(r"unchecked: ([^(]*)", block.note)
    return nodes, set(waived.group(1).split()) if waived else set()


def command_head(cmd: str) -> tuple[list[str], list[str], list[str]]:
    """``cmd`` as (the variables it sets, its program and up to two subcommands, the
    rest of its words)."""
    words = shlex.split(cmd)
    words = words[1:] if words[0] == "export" else words
    keys = []
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # VAR=value, export VAR=...
        keys.append(words.pop(0).partition("=")[0])
    if not words:
        return keys, [], []
    head = [Path(words[0]).name]
    for word in words[1:3]:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        head.append(word)
    return keys, head, words[len(head) :]


def command_tokens(cmd: str) -> set[str]:
    """What a test must name to check ``cmd``: the variables it sets, its program and
    subcommands, the repository files it names, every ``--option``, and the KEY of
    every KEY=VALUE word."""
    keys, head, rest = command_head(cmd)
    found = {*keys, *head}
    for word in rest:
        if word.startswith("--"):
            found.add(word.partition("=")[0])
        elif re.fullmatch(r"\+*[A-Za-z_][\w.]*=.*", word):
            found.add(word.partition("=")[0].lstrip("+"))
        elif "/" in word and (REPO / word).is_file():
            found.add(Path(word).name)
    return found


def names(source: str, *words: str) -> bool:
    """Whether ``source`` names ``words`` as a whole word, or a phrase: in a row, in text
    or as adjacent items of a list."""
    phrase = r"[\s\"',\[\]()]+".join(map(re.escape, words))
    return re.search(rf"(?<![\w.-]){phrase}(?![\w-])", source) is not None


def _module(path: Path) -> tuple[list[str], dict[str, ast.AST]]:
    lines = path.read_text().splitlines()
    defs: dict[str, ast.AST] = {}
    for node in ast.parse("\n".join(lines)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                defs.update((n.id, node) for n in ast.walk(target) if isinstance(n, ast.Name))
    return lines, defs


def code_of(node_id: str) -> str:
    """The code of test ``path::name`` (empty if there is none): its function with its
    decorators, and, transitively, the module-level names it uses and the fixtures it
    asks for, from its module or a conftest.py above it."""
    rel, _, name = node_id.partition("::")
    path = REPO / rel
    if not path.is_file():
        return ""
    tests = REPO / "tests"
    conftests = [d / "conftest.py" for d in path.parents if d == tests or tests in d.parents]
    conftests = [c for c in conftests if c.is_file()]
    mods = {p: _module(p) for p in [path, *conftests]}
    test = mods[path][1].get(name)
    if not isinstance(test, ast.FunctionDef):
        return ""
    parts, seen, todo = [], set(), [(path, test)]
    while todo:
        where, node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        lines, defs = mods[where]
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        parts.append("\n".join(lines[first - 1 : node.end_lineno]))
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        todo += [(where, defs[u]) for u in used if u in defs]
        if isinstance(node, ast.FunctionDef):  # fixtures: own module first, then conftests
            for arg in (a.arg for a in node.args.args):
                scope = next((m for m in [where, *conftests] if arg in mods[m][1]), None)
                if scope is not None:
                    todo.append((scope, mods[scope][1][arg]))
    text = "\n".join(parts)
    if node_id == RUN_TEST:
        text += "\n".join(b.text for b in _of("run"))
    return text


@pytest.mark.parametrize("block", _of("illustrative"), ids=lambda b: b.where)
def test_illustrative_blocks_name_the_tests_that_check_them(block):
    nodes, waived = claims(block)
    assert nodes, f"{block.where}: say which tests check it: `checked by tests/P.py::test_x`"
    code = {}
    for node in nodes:
        code[node] = code_of(node)
        assert code[node], f"{block.where}: {node} is not a test function"
        assert not re.search(r"mark\.(skip\(|xfail)", code[node]), f"{node} does not run"
    covering = set()
    for cmd in block.commands():
        need = command_tokens(cmd) - waived
        _, head, _ = command_head(cmd)
        if len(head) > 1 and not any(t.startswith("--") for t in need):
            need = need - set(head) | {" ".join(head)}  # few words: the phrase, in a row
        lacks = {n: sorted(t for t in need if not names(c, *t.split())) for n, c in code.items()}
        full = [n for n, missing in lacks.items() if not missing]
        assert full, f"{block.where}: no named test names all of `{cmd}`: {lacks}"
        covering.update(full)
    assert covering == set(nodes), f"{block.where}: {set(nodes) - covering} check no command"
    tokens = set().union(*(command_tokens(c) for c in block.commands()))
    assert waived <= tokens, f"{block.where}: unchecked {waived - tokens} not in the block"
    for token in waived:
        checked = [n for n, c in code.items() if names(c, token)]
        assert not checked, f"{block.where}: {token} is checked by {checked}: not unchecked"


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
        capture_output=True, text=True, env=_env(), timeout=240, cwd=REPO,
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
