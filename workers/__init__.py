"""Runtime pieces LongAct plugs into verl (installed as ``longact.workers``).

- ``cpu_platform``: a verl platform for machines without an accelerator (gloo).
- ``fsdp_engine``: verl's FSDP2 language-model engine registered for that platform.
- ``hf_rollout``: a rollout backend serving ``transformers.generate`` from a Ray actor.
- ``vllm_cpu``: verl's vLLM server and replica on the CPU build of vLLM.
- ``plugin``: the ``verl.plugins`` entry point that registers all of the above.

Nothing here imports Ray or verl at package import time.
"""
