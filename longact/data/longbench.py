"""LongBench v2 from a local file: read, validate, truncate, prompt, score.

The file is the official ``data.json`` (a JSON list; JSON lines also accepted) of records
with ``_id, domain, sub_domain, difficulty (easy|hard), length (short|medium|long),
question, choice_A..choice_D, answer (A-D), context``. Nothing is downloaded.

- ``load(path)`` / ``validate(records)``: a missing or empty field, or a value outside its
  set, raises ``LongBenchError`` naming the row index, its ``_id`` and the field.
- ``build_prompt(record, context)``: LongBench v2's zero-shot template, ending with the
  answer format "The correct answer is (insert answer here)".
- ``truncate_middle(text, tokenizer, max_tokens)``: keep the first and last halves.
  Departure: LongBench's ``pred.py`` cuts the middle of the whole prompt; we cut the
  context only, so the question and the choices are never lost.
- ``make_rows(records, tokenizer, length)``: verl RL rows (``data_source`` =
  ``longbench_v2``) whose prompts fit ``length`` tokens after the chat template.
- ``score(records, responses)``: accuracy overall, by difficulty and by length class.
"""

from __future__ import annotations

import json
from pathlib import Path

FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
          "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")  # fmt: skip
ALLOWED = {
    "answer": ("A", "B", "C", "D"),
    "difficulty": ("easy", "hard"),
    "length": ("short", "medium", "long"),
}
DATA_SOURCE = "longbench_v2"
TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n"
    '(C) $C_C$\n(D) $C_D$\n\nFormat your response as follows: "The correct answer is '
    '(insert answer here)".'
)
_HEAD, _TAIL = TEMPLATE.split("$DOC$")


class LongBenchError(ValueError):
    """A LongBench v2 file or record that does not follow the schema."""


def validate(records) -> list[dict]:
    """Check every record; returns them as a list."""
    if not isinstance(records, list):
        raise LongBenchError(f"expected a list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise LongBenchError(f"row {i}: expected an object, got {type(rec).__name__}")
        where = f"row {i} (_id={rec.get('_id', '?')})"
        for name in FIELDS:
            value = rec.get(name)
            if value is None or (name != "context" and not str(value).strip()):
                raise LongBenchError(f"{where}: missing field {name!r}")
            if not isinstance(value, str):
                raise LongBenchError(f"{where}: field {name!r} must be a string")
        for name, allowed in ALLOWED.items():
            if rec[name] not in allowed:
                raise LongBenchError(
                    f"{where}: field {name!r} is {rec[name]!r}, not one of {', '.join(allowed)}"
                )
    return records


def load(path: str | Path) -> list[dict]:
    """Read and validate a LongBench v2 file (JSON list or JSON lines)."""
    path = Path(path)
    if not path.is_file():
        raise LongBenchError(f"LongBench v2 file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LongBenchError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); LongBench v2 files are "
            "UTF-8 JSON: re-encode it, e.g. `iconv -f LATIN1 -t UTF-8`"
        ) from None
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        if path.suffix == ".jsonl":  # JSON lines, even of a single record
            data = [json.loads(line) for line in lines]
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        raise LongBenchError(f"{path}: not JSON nor JSON lines ({e})") from None
    if isinstance(data, dict):
        raise LongBenchError(
            f"{path}: expected a list of records, got one record (a dict); wrap it in [ ] "
            "or name the file .jsonl (one record per line)"
        )
    return validate(data)


def write_json(records: list[dict], path: str | Path) -> Path:
    """Write records as LongBench v2's JSON list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(validate(records), ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def length_class(num_words: int) -> str:
    """LongBench v2's length classes by word count: <32k short, <128k medium, else long."""
    return "short" if num_words < 32_000 else "medium" if num_words < 128_000 else "long"


def build_prompt(record: dict, context: str | None = None) -> str:
    """The zero-shot prompt for a record (``context`` overrides ``record["context"]``)."""
    body = _TAIL.replace("$Q$", record["question"].strip())
    for c in "ABCD":
        body = body.replace(f"$C_{c}$", record[f"choice_{c}"].strip())
    return _HEAD + (record["context"] if context is None else context) + body


def context_of(prompt: str) -> str:
    """The context back out of a prompt made by ``build_prompt``."""
    start = prompt.index(_HEAD) + len(_HEAD)
    return prompt[start : prompt.rindex("\n</text>")]


def truncate_middle(text: str, tokenizer, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens`` tokens, keeping the head and tail halves."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    head = max_tokens // 2
    tail = max_tokens - head
    return tokenizer.decode(ids[:head]) + tokenizer.decode(ids[len(ids) - tail :] if tail else [])


def make_rows(records: list[dict], tokenizer, length: int) -> list[dict]:
    """verl RL rows whose prompts are at most ``length`` tokens (middle of contexts cut)."""
    from longact.data.tasks import fitter_for

    fitter = fitter_for(tokenizer)
    rows = []
    for i, rec in enumerate(validate(records)):
        overhead = fitter.count(build_prompt(rec, ""))
        if overhead >= length:
            raise LongBenchError(
                f"row {i} (_id={rec['_id']}): question and choices alone take {overhead} "
                f"tokens, more than --length {length}"
            )
        context, budget = rec["context"], length - overhead
        content = build_prompt(rec, context)
        n = fitter.count(content)
        while n > length:  # re-tokenizing a cut can differ by a few tokens: cut again
            context = truncate_middle(rec["context"], fitter.tokenizer, max(budget, 0))
            content = build_prompt(rec, context)
            n = fitter.count(content)
            budget -= max(1, n - length)
        meta = {k: rec[k] for k in FIELDS if k != "context"}
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": content}],
                "ability": "multiple_choice",
                "reward_model": {"style": "rule", "ground_truth": [rec["answer"]]},
                "extra_info": {
                    "task": DATA_SOURCE,
                    "length": length,
                    "num_tokens": n,
                    "depth": None,
                    "index": i,
                    "seed": None,
                    "answer": f"The correct answer is ({rec['answer']})",
                    "truncated": context != rec["context"],
                    "longbench": meta,
                },
            }
        )
    return rows


def to_records(rows: list[dict]) -> list[dict]:
    """LongBench v2 records back from rows of the ``mcq`` task or ``make_rows``."""
    out = []
    for row in rows:
        meta = dict(row["extra_info"]["longbench"])
        meta["context"] = context_of(row["prompt"][-1]["content"])
        out.append(meta)
    return out


def score(records: list[dict], responses: list[str]) -> dict:
    """Accuracy (0..1) overall, by difficulty and by length, from raw responses."""
    from longact.rewards.scoring import extract_choice

    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    hits = [extract_choice(r or "") == rec["answer"] for rec, r in zip(records, responses)]

    def acc(keep) -> dict:
        sel = [h for h, rec in zip(hits, records) if keep(rec)]
        return {"accuracy": sum(sel) / len(sel) if sel else None, "n": len(sel)}

    return {
        **acc(lambda rec: True),
        "by_difficulty": {
            d: acc(lambda rec, d=d: rec["difficulty"] == d) for d in ALLOWED["difficulty"]
        },
        "by_length": {c: acc(lambda rec, c=c: rec["length"] == c) for c in ALLOWED["length"]},
    }
