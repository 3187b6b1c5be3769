"""One GPU check of LongAct's cluster path: the GRPO recipe, a tiny model, one GPU.

Run by ``scripts/gpu_check.sh`` (which installs what the machine lacks from wheels
brought along). Steps, all through ``longact-train recipe=grpo`` on CUDA:

1. a tiny Qwen3 model and needle-in-a-haystack data, written here (nothing downloaded);
2. LongAct on: FSDP2 (bf16 compute), gradient checkpointing, parameter and optimizer
   offload, the ``hf`` rollout, a refresh every 2 steps, a checkpoint after every step;
   the run is killed (SIGKILL, whole process group) once the step-2 checkpoint is
   written, then resumed to step 4;
3. checks: at every step the W_Q / W_K rows outside the mask in force are bit-identical,
   the mask versions run 1, 1, 2, 2, and the resumed run started at step 3;
4. LongAct off: the same 4 steps, no checkpoints;
5. the actor-update time with LongAct on vs off (``timing_s/update_actor``, median over
   steps 2-4), as a ratio.

``--device cpu`` runs the same flow with the CPU recipe (``grpo_cpu``), to check the
script itself on a machine without a GPU. The report goes to stdout and to
``OUT/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from longact.train.logs import parse_step_metrics
from longact.train.runtime import state_path

QK = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
STEPS = 4
KILL_AFTER = 2


def overrides(device: str, model: Path, data: dict[str, Path], ckpt: Path) -> list[str]:
    common = [
        f"actor_rollout_ref.model.path={model}",
        f"data.train_files={data['train']}",
        f"data.val_files={data['val']}",
        "data.max_prompt_length=320",
        "data.max_response_length=8",
        "data.train_batch_size=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        f"trainer.default_local_dir={ckpt}",
        "trainer.logger=[console]",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.project_name=longact_gpu_check",
        "longact.ratio=0.3",
        "longact.refresh_interval=2",
        "longact.refresh_async=false",
    ]
    if device == "cpu":
        return ["recipe=grpo_cpu", *common, "trainer.n_gpus_per_node=2"]
    return [
        "recipe=grpo",
        *common,
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        # no flash-attn on the check machine: sdpa on padded batches
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=false",
        "actor_rollout_ref.model.enable_gradient_checkpointing=true",
        "actor_rollout_ref.actor.use_torch_compile=false",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.actor.fsdp_config.param_offload=true",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=true",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=8192",
        "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=8192",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=8192",
        "actor_rollout_ref.rollout.name=hf",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "reward.num_workers=1",
        "data.dataloader_num_workers=0",
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)  # a fresh local cluster
    e.update(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", WANDB_MODE="offline")
    e["LONGACT_CONSOLE"] = "full"  # verl's metric lines, read below
    if torch.cuda.is_available():
        e["LONGACT_HF_ROLLOUT_GPU"] = "1"  # the hf rollout generates on the GPU too
    e.setdefault("PYTHONWARNINGS", "ignore")
    return e


def train(args: list[str], log: Path, kill_after: int | None = None, ckpt: Path | None = None):
    """Run longact-train; with ``kill_after``, SIGKILL it once that step's checkpoint and
    metrics line are out. Returns the log text."""
    cmd = [shutil.which("longact-train") or "longact-train", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), start_new_session=True
        )
        deadline = time.time() + 420
        try:
            while proc.poll() is None:
                if kill_after is not None and _latest(ckpt) >= kill_after:
                    if f"step:{kill_after} - " in log.read_text(errors="replace"):
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        return log.read_text(errors="replace")
                if time.time() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    raise SystemExit(f"gpu_check: {log.name} ran past 7 minutes")
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(
            f"gpu_check: {' '.join(cmd[:2])} exited {proc.returncode}:\n{text[-6000:]}"
        )
    return text


def _latest(ckpt: Path | None) -> int:
    f = ckpt / "latest_checkpointed_iteration.txt" if ckpt else None
    return int(f.read_text().strip()) if f and f.is_file() else 0


def check_frozen_rows(model: Path, ckpt: Path) -> list[int]:
    """Frozen rows bit-identical at every step; returns the mask version of each step."""
    from safetensors.torch import load_file

    from longact.core.masks import MaskSet

    prev = load_file(str(model / "model.safetensors"))
    versions = []
    for step in range(1, STEPS + 1):
        actor = ckpt / f"global_step_{step}" / "actor"
        state = torch.load(state_path(actor, 0), weights_only=False)
        masks = MaskSet.from_state_dict(state["coordinator"]["masks"])
        cur = load_file(str(actor / "huggingface" / "model.safetensors"))
        for name, w0 in prev.items():
            if not name.endswith(QK):
                continue
            layer = int(name.split(".layers.")[1].split(".")[0])
            keep = masks[(layer, "q" if ".q_proj." in name else "k")]
            if not torch.equal(w0[~keep], cur[name][~keep]):
                raise SystemExit(f"gpu_check: step {step}: a frozen row of {name} moved")
            if not (w0[keep] != cur[name][keep]).any():
                raise SystemExit(f"gpu_check: step {step}: no trainable row of {name} moved")
        versions.append(masks.version)
        prev = cur
    return versions


def median_update_s(metrics: dict[int, dict[str, float]], steps: range) -> float:
    return statistics.median(metrics[s]["timing_s/update_actor"] for s in steps if s in metrics)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device is visible (use --device cpu to check the script)"
        )
    from longact.data.tasks import make_dataset, write_parquet
    from longact.models.tiny import write_tiny_model

    t0 = time.time()
    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = write_tiny_model(out / "model", size="xs", seed=0)
    rows = make_dataset("niah_single", model, length=256, n=72, seed=0)
    data = {
        "train": write_parquet(rows[:64], out / "train.parquet"),
        "val": write_parquet(rows[64:], out / "val.parquet"),
    }

    on_ckpt, off_ckpt = out / "ckpt_on", out / "ckpt_off"
    base_on = overrides(a.device, model, data, on_ckpt)
    first = train(
        [
            *base_on,
            f"trainer.total_training_steps={STEPS}",
            "trainer.save_freq=1",
            "trainer.resume_mode=auto",
        ],
        out / "on_first.log",
        kill_after=KILL_AFTER,
        ckpt=on_ckpt,
    )
    resumed = train(
        [
            *base_on,
            f"trainer.total_training_steps={STEPS}",
            "trainer.save_freq=1",
            "trainer.resume_mode=auto",
        ],
        out / "on_resume.log",
    )
    on = {**parse_step_metrics(first), **parse_step_metrics(resumed)}
    resumed_steps = sorted(parse_step_metrics(resumed))
    versions = check_frozen_rows(model, on_ckpt)
    off = parse_step_metrics(
        train(
            [
                *overrides(a.device, model, data, off_ckpt),
                f"trainer.total_training_steps={STEPS}",
                "trainer.save_freq=-1",
                "longact.enable=false",
            ],
            out / "off.log",
        )
    )
    on_s, off_s = (
        median_update_s(on, range(2, STEPS + 1)),
        median_update_s(off, range(2, STEPS + 1)),
    )
    report = {
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "mask_versions": versions,
        "resumed_steps": resumed_steps,
        "frozen_rows_bit_identical": True,
        "update_actor_s_on": on_s,
        "update_actor_s_off": off_s,
        "update_actor_ratio_on_off": on_s / off_s,
        "wall_s": time.time() - t0,
    }
    problems = []
    if versions != [1, 1, 2, 2]:
        problems.append(f"mask versions {versions}, expected [1, 1, 2, 2]")
    if resumed_steps != list(range(KILL_AFTER + 1, STEPS + 1)):
        problems.append(f"the resumed run logged steps {resumed_steps}")
    report["problems"] = problems
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if problems:
        raise SystemExit("gpu_check: " + "; ".join(problems))
    print(f"gpu_check: OK in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
