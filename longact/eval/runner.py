"""Evaluate a model on the synthetic tasks (and LongBench v2) across prompt lengths.

``evaluate(model_dir, tasks, lengths, n, ...)`` generates ``n`` samples per task and
length with the model's own tokenizer (``longact.data.make_dataset``), decodes greedily
and scores each response with the training reward (``longact.rewards.compute_score``),
so evaluation and RL agree on what counts as right. ``model_dir`` is any Hugging Face
causal LM directory whose tokenizer has a chat template, or a verl checkpoint
(``global_step_N/actor`` or its ``huggingface/`` folder, which must then hold weights),
or a LoRA adapter (a peft folder, or a LoRA run's step folder with ``lora_adapter/``):
it is merged into its base model (``base=``, default: the adapter's base path) in a
temporary directory that the evaluation reads, and removed after.

Backends: ``hf`` (transformers ``generate``, batched, left padding; the CPU path) and
``vllm`` (when vLLM imports and CUDA is present; ``auto`` picks it then). With
``longbench=FILE`` the first ``n`` records of a LongBench v2 file are also evaluated at
every length (contexts cut in the middle) and broken down by difficulty and length class.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from longact.core.lora import find_adapter, merge_adapter
from longact.data import longbench as lb
from longact.data.tasks import make_dataset
from longact.eval import report
from longact.rewards import compute_score

WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


class EvalError(ValueError):
    """Bad evaluation input (missing model, tokenizer without chat template, ...)."""


def resolve_model_dir(path: str | Path) -> Path:
    """The directory holding config.json + weights: ``path`` or its verl sub-folder."""
    p = Path(path)
    if not p.is_dir():
        raise EvalError(f"model directory {p} does not exist")
    for cand in (p, p / "huggingface", p / "actor" / "huggingface"):
        if (cand / "config.json").is_file():
            if not any(next(cand.glob(g), None) for g in WEIGHT_GLOBS):
                raise EvalError(
                    f"{cand} has a config but no weights; for a verl checkpoint save them with "
                    "checkpoint.save_contents including 'hf_model', or merge the shards with "
                    "`python -m verl.model_merger merge --backend fsdp --local_dir <actor dir> "
                    "--target_dir <out>`"
                )
            return cand
    raise EvalError(f"no config.json in {p} (nor in {p}/huggingface): not a model directory")


@contextlib.contextmanager
def model_directory(
    path: str | Path, base: str | Path | None = None
) -> Iterator[tuple[Path, Path]]:
    """(directory to load, what was evaluated): ``resolve_model_dir(path)`` twice, or for
    a LoRA adapter the adapter merged into its base, in a temporary directory removed on
    exit, and the adapter's folder."""
    adapter = find_adapter(path)
    if adapter is None:
        resolved = resolve_model_dir(path)
        yield resolved, resolved
        return
    with tempfile.TemporaryDirectory(prefix="longact-eval-") as tmp:
        yield merge_adapter(adapter, Path(tmp) / "merged", base), adapter


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tok, "chat_template", None):
        raise EvalError(f"the tokenizer in {model_dir} has no chat template")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class HFGenerator:
    """Batched greedy decoding with transformers (left padding)."""

    name = "hf"

    def __init__(self, model_dir: Path, tokenizer, max_new_tokens: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        self.model.eval()
        self.tok, self.device, self.max_new_tokens = tokenizer, device, max_new_tokens

    def __call__(self, prompts: list[str]) -> list[str]:
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with self.torch.inference_mode():
            out = self.model.generate(
                **enc,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        return self.tok.batch_decode(new, skip_special_tokens=True)


class VLLMGenerator:
    """Greedy decoding with vLLM (GPU only; not exercised by the CPU tests). Prompts go in
    as token ids, so vLLM adds no BOS of its own and lengths match the data."""

    name = "vllm"

    def __init__(self, model_dir: Path, tokenizer, max_new_tokens: int, max_len: int):
        from vllm import LLM, SamplingParams

        self.tok = tokenizer
        self.llm = LLM(model=str(model_dir), max_model_len=max_len + max_new_tokens)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)

    def __call__(self, prompts: list[str]) -> list[str]:
        ids = self.tok(prompts, add_special_tokens=False)["input_ids"]
        inputs = [{"prompt_token_ids": x} for x in ids]
        return [o.outputs[0].text for o in self.llm.generate(inputs, self.params, use_tqdm=False)]


def pick_backend(backend: str) -> str:
    if backend not in ("auto", "hf", "vllm"):
        raise EvalError(f"unknown backend {backend!r}; valid: auto, hf, vllm")
    if backend != "auto":
        return backend
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return "hf"
    return "vllm" if torch.cuda.is_available() else "hf"


Job = tuple[str, int, list[dict]]  # (task, length, dataset rows)


def make_jobs(
    tok,
    tasks: list[str],
    lengths: list[int],
    n: int,
    seed: int,
    task_opts: dict | None,
    records: list[dict] = (),
) -> list[Job]:
    """The rows to score: ``n`` per task and length (and the LongBench v2 ``records`` cut
    to every length), with the model's tokenizer."""
    from longact.data.base import OPTIONS

    jobs = []
    for task in tasks:
        opts = {k: v for k, v in (task_opts or {}).items() if k in OPTIONS[task]}
        for length in lengths:
            jobs.append((task, length, make_dataset(task, tok, length, n, seed=seed, **opts)))
    for length in lengths if records else []:
        jobs.append((lb.DATA_SOURCE, length, lb.make_rows(records, tok, length)))
    return jobs  # fmt: skip


def count_batches(jobs: list[Job], batch_size: int) -> int:
    return sum(-(-len(rows) // batch_size) for _, _, rows in jobs)


def prompt_texts(tok, rows: list[dict]) -> list[str]:
    """The chat-templated prompt of each row, as the model sees it."""
    return [
        tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]


def run_jobs(generate, tok, jobs: list[Job], batch_size: int, bar=None) -> list[dict]:
    """Generate for every row of ``jobs`` (in order, ``batch_size`` at a time) and score
    each response with the training reward: one sample record per row."""
    samples = []
    for task, length, rows in jobs:
        if bar is not None:
            bar.set_postfix_str(f"{task}@{length}")
        texts = prompt_texts(tok, rows)
        responses: list[str] = []
        for i in range(0, len(texts), batch_size):
            responses += generate(texts[i : i + batch_size])
            if bar is not None:
                bar.update(1)
        for row, resp in zip(rows, responses):
            gt = row["reward_model"]["ground_truth"]
            s = compute_score(row["data_source"], resp, gt, row["extra_info"])
            info = row["extra_info"]
            samples.append(
                {
                    "task": task,
                    "length": length,
                    "index": info["index"],
                    "depth": info["depth"],
                    "num_tokens": info["num_tokens"],
                    "score": s["score"],
                    "recall": s["recall"],
                    "response": resp,
                    "ground_truth": list(gt),
                }
            )
    return samples


def evaluate(
    model_dir: str | Path,
    tasks: list[str],
    lengths: list[int],
    n: int,
    *,
    out_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    backend: str = "auto",
    longbench: str | Path | None = None,
    progress: bool = True,
    task_opts: dict | None = None,
    base: str | Path | None = None,
) -> dict:
    """Score ``model_dir`` on every task x length; write the report files to ``out_dir``.

    ``task_opts`` (e.g. ``{"value_digits": 2}``) go to every task that has the option;
    ``base`` is the base model of a LoRA adapter given as ``model_dir``.
    """
    from longact.data.tasks import TASKS

    for task in tasks:
        TASKS.get(task)  # unknown task: error listing the valid ones, before loading anything
    if n < 1 or batch_size < 1 or max_new_tokens < 1 or not lengths or min(lengths) < 1:
        raise EvalError("n, batch size, max new tokens and lengths must be positive")
    records = lb.load(longbench)[:n] if longbench else []
    backend = pick_backend(backend)
    with model_directory(model_dir, base) as (loaded, model_path):  # weights in memory after
        tok = load_tokenizer(loaded)
        if backend == "vllm":
            generate = VLLMGenerator(loaded, tok, max_new_tokens, max(lengths))
        else:
            generate = HFGenerator(loaded, tok, max_new_tokens)
    jobs = make_jobs(tok, tasks, lengths, n, seed, task_opts, records)
    bar = tqdm(total=count_batches(jobs, batch_size), desc="eval", disable=not progress)
    samples = run_jobs(generate, tok, jobs, batch_size, bar)
    bar.close()
    results = {
        "model": str(model_path),
        "backend": backend,
        "seed": seed,
        "n": n,
        "max_new_tokens": max_new_tokens,
        "tasks": list(tasks) + ([lb.DATA_SOURCE] if records else []),
        "lengths": list(lengths),
        "summary": report.summarize(samples),
        "samples": samples,
    }
    if records:
        results["longbench"] = {}
        for length in lengths:
            resp = [
                s["response"]
                for s in samples
                if s["task"] == lb.DATA_SOURCE and s["length"] == length
            ]
            results["longbench"][str(length)] = lb.score(records, resp)
    if out_dir is not None:
        results["files"] = {k: str(v) for k, v in report.write(results, out_dir).items()}
    return results
