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


cpu = read_requirements("cpu.txt")
setup(
    name="longact",
    version="0.1.0",
    description="Saliency-guided sparse Q/K updates for long-context RL, built on verl",
    python_requires=">=3.10",
    packages=[
        "longact",
        "longact.core",
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
    package_data={"longact.recipes": ["*.yaml"], "longact.hydra_configs": ["*.yaml", "**/*.yaml"]},
    # verl, ray and transformers are the framework; torch is left to the environment's
    # set (requirements/cpu.txt or gpu.txt) so a plain install never pulls a CUDA build.
    install_requires=[r for r in cpu if not r.startswith("torch")],
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
