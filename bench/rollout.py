"""Figure 6: the CPU rollouts side by side, hf vs vllm, on the demo's run settings.

verl's v1 trainer waits for a step's rollouts by polling its replay buffer every 2 s, so
its ``timing_s/gen`` on a CPU step reads 2.0 s for either engine whenever the rollout
itself takes less. This figure times the rollout servers directly instead, each the class
a ``grpo_cpu`` run starts (``HFRolloutServer``; verl's ``vLLMHttpServer`` as
``longact.workers.vllm_cpu`` subclasses it), in a Ray actor, with the rollout settings a
``grpo_cpu`` run composes (the CPU platform's fp32, eager vLLM, KV cache and sync bucket):

- start: constructing the actor until it serves (model load; vLLM's engine and workers);
- a step's rollout: the demo's batch, 4 prompts x n=8 samples submitted at once (as the
  agent loop does), prompts of the demo's RL length (128 tokens), temperature 1 with
  log-probs; response lengths 8 (the demo's) and 64 (to show how each scales);
- a weight sync: the whole state dict, as a step's sync sends it (hf: one Ray call;
  vLLM: shared-memory buckets into the worker extension's reload, as verl's
  ``ServerAdapter`` sends them).

Engines run one after the other in one Ray session on the xs tiny model; the first round
of each setting is dropped as warm-up.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import figure, fmt_s, summarize

ENGINES = ("hf", "vllm")
PROMPTS, SAMPLES, PROMPT_LEN = 4, 8, 128  # hydra_configs/demo.yaml: batch 4, n=8, length 128


def _platform_rollout() -> dict[str, Any]:
    """The rollout settings a ``grpo_cpu`` run composes (hydra_configs/platform/cpu.yaml)."""
    from omegaconf import OmegaConf

    from longact.train.doctor import compose

    _, c = compose(["recipe=grpo_cpu", "actor_rollout_ref.model.path=unused"])
    r = c.actor_rollout_ref.rollout
    return {
        "dtype": r.dtype,
        "enforce_eager": r.enforce_eager,
        "free_cache_engine": r.free_cache_engine,
        "engine_kwargs": {"vllm": OmegaConf.to_container(r.engine_kwargs.vllm, resolve=True)},
        "bucket_mb": int(r.checkpoint_engine.update_weights_bucket_megabytes),
    }


def _configs(model: Path, response: int, platform: dict[str, Any]):
    from verl.workers.config import HFModelConfig, RolloutConfig

    rollout = RolloutConfig(
        name="vllm",
        prompt_length=PROMPT_LEN + 64,
        response_length=response,
        tensor_model_parallel_size=1,
        max_model_len=PROMPT_LEN + 64 + response,
        max_num_batched_tokens=4096,
        max_num_seqs=PROMPTS * SAMPLES,
        enable_sleep_mode=False,
        load_format="auto",
        **{k: v for k, v in platform.items() if k != "bucket_mb"},
    )
    return rollout, HFModelConfig(path=str(model))


def _start(engine: str, model: Path, response: int, platform: dict[str, Any]):
    import ray
    from verl.plugin.platform import get_platform
    from verl.workers.rollout.replica import RolloutMode

    rollout, model_cfg = _configs(model, response, platform)
    if engine == "hf":
        from longact.workers.hf_rollout import HFRolloutServer

        actor = ray.remote(HFRolloutServer).options(num_cpus=0, max_concurrency=64)
        server = actor.remote(config=rollout, model_config=model_cfg)
        ray.get(server.ready.remote())
        return server
    from longact.workers.vllm_cpu import CPUvLLMHttpServer

    env = {v: "1" for v in get_platform().ray_noset_envvars()}  # as vLLMReplica sets them
    env.update(get_platform().rollout_env_vars())
    actor = ray.remote(CPUvLLMHttpServer).options(
        num_cpus=0, max_concurrency=64, runtime_env={"env_vars": env}
    )
    server = actor.remote(
        config=rollout, model_config=model_cfg, rollout_mode=RolloutMode.STANDALONE,
        workers=[], replica_rank=0, node_rank=0, gpus_per_node=1, nnodes=1,
        cuda_visible_devices="0",
    )  # fmt: skip
    ray.get(server.launch_server.remote())
    return server


async def _one_step(server, prompts: list[list[int]], response: int, tag: str) -> float:
    params = {"temperature": 1.0, "top_p": 1.0, "max_tokens": response, "logprobs": True}
    calls = [
        server.generate.remote(p, params, f"{tag}-{i}-{j}")
        for i, p in enumerate(prompts)
        for j in range(SAMPLES)
    ]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*calls)
    took = time.perf_counter() - t0
    if any(len(o.token_ids) == 0 or not o.log_probs for o in outs):
        raise RuntimeError(f"{tag}: a request returned no tokens or no log-probs")
    return took


def _sync(engine: str, server, state: dict, bucket_mb: int) -> float:
    import ray

    t0 = time.perf_counter()
    if engine == "hf":
        ray.get(server.load_weights.remote(state))
        return time.perf_counter() - t0
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    job = ray.get_runtime_context().get_job_id()
    handle = f"ipc:///tmp/rl-colocate-zmq-{job}-replica-0-rank-0.sock"  # replica 0, rank 0

    async def send():
        done = server.collective_rpc.remote("update_weights_from_ipc", kwargs={"use_shm": True})
        sender = BucketedWeightSender(zmq_handle=handle, bucket_size_mb=bucket_mb, use_shm=True)
        await sender.async_send_weights(iter(state.items()))
        await done
        await server.clear_kv_cache.remote()

    asyncio.run(send())
    return time.perf_counter() - t0


def run(rounds: int = 4, responses: tuple[int, ...] = (8, 64), log=print) -> dict[str, Any]:
    import ray
    from safetensors.torch import load_file

    import longact.workers.plugin  # noqa: F401  (the cpu platform, as verl's entry point)
    from longact.data.tasks import make_dataset
    from longact.models.tiny import write_tiny_model

    t_fig = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="longact_bench_rollout_"))
    model = write_tiny_model(root / "xs", size="xs", seed=0)
    rows = make_dataset("niah_single", model, length=PROMPT_LEN, n=PROMPTS, seed=0,
                        value_digits=2)  # fmt: skip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [
        tok.apply_chat_template(list(r["prompt"]), add_generation_prompt=True, tokenize=False)
        for r in rows
    ]
    prompts = [tok(x, add_special_tokens=False)["input_ids"] for x in texts]
    state = load_file(str(model / "model.safetensors"))
    platform = _platform_rollout()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    res: dict[str, dict[str, Any]] = {}
    try:
        for engine in ENGINES:
            for response in responses:
                t0 = time.perf_counter()
                server = _start(engine, model, response, platform)
                start_s = time.perf_counter() - t0
                steps = [
                    asyncio.run(_one_step(server, prompts, response, f"{engine}{k}"))
                    for k in range(rounds + 1)
                ][1:]
                syncs = [_sync(engine, server, state, platform["bucket_mb"]) for _ in range(3)][1:]
                after = asyncio.run(_one_step(server, prompts, response, f"{engine}-after"))
                res[f"{engine}/{response}"] = {
                    "start_s": start_s,
                    "step_s": steps,
                    "sync_s": syncs,
                    "after_sync_s": after,
                }
                step, sync = statistics.median(steps), statistics.median(syncs)
                log(
                    f"  {engine}, {response} tokens: start {start_s:.1f} s, "
                    f"step {step:.2f} s, sync {sync:.3f} s"
                )
                ray.kill(server)
    finally:
        ray.shutdown()
    return _figure(res, rounds, responses, time.perf_counter() - t_fig)


def _figure(res: dict, rounds: int, responses: tuple[int, ...], seconds: float) -> dict:
    fig = figure(
        "rollout",
        f"6. CPU rollouts, hf vs vllm, the demo's settings ({PROMPTS} prompts x {SAMPLES} "
        f"samples of {PROMPT_LEN} tokens, xs model; {rounds} timed rounds each)",
        ["measure", "hf", "vllm", "vllm / hf"],
    )
    for response in responses:
        hf, vl = res[f"hf/{response}"], res[f"vllm/{response}"]
        h, v = summarize(hf["step_s"]), summarize(vl["step_s"])
        ratio = f"{v['median'] / h['median']:.2f}"
        fig["rows"].append([f"a step's rollout, {response} new tokens", fmt_s(h), fmt_s(v), ratio])
    hf, vl = res[f"hf/{responses[0]}"], res[f"vllm/{responses[0]}"]
    hs, vs = summarize(hf["sync_s"]), summarize(vl["sync_s"])
    ratio = f"{vs['median'] / hs['median']:.2f}"
    fig["rows"].append(["weight sync (whole state dict)", fmt_s(hs), fmt_s(vs), ratio])
    h0, v0 = hf["start_s"], vl["start_s"]
    fig["rows"].append(
        ["start (model load, engine)", f"{h0:.1f} s", f"{v0:.1f} s", f"{v0 / h0:.2f}"]
    )
    fig["notes"] += [
        "Medians [min-max] over the timed rounds; the first round of each setting is dropped.",
        "verl's own timing_s/gen cannot tell these apart at this size: its v1 trainer polls "
        "for finished rollouts every 2 s, so a CPU step's gen reads 2.0 s for either.",
        "A grpo_cpu run starts one server per rank (2 here) and pays the start once.",
    ]
    fig["raw"] = res
    fig["seconds"] = seconds
    return fig
