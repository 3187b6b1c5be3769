"""Where the CPU tier's torch comes from (``scripts/install.sh cpu`` runs this).

PyPI's ``torch`` on Linux x86_64 is the CUDA build: several GB of torch and nvidia-*
wheels for a CPU demo. The CPU build comes from PyTorch's CPU wheel index, or from what
a machine already has. In order, the first rule that applies wins:

1. ``keep``: the target environment already has torch PIN built without CUDA;
2. a ``find-links`` folder pip is configured with (``PIP_FIND_LINKS`` or ``pip config``)
   holds the CPU wheel ``torch-PIN+cpu-*.whl``: install ``torch==PIN+cpu`` from it;
3. ``LONGACT_TORCH_INDEX`` names an index (a mirror of PyTorch's CPU index): use it;
4. not Linux: PyPI's own wheel is the CPU build there: ``torch==PIN``;
5. PyTorch's CPU index answers within ``PROBE_S`` seconds: ``--index-url`` it;
6. otherwise ``torch==PIN`` from the configured indexes, with a warning on stderr that
   this may be the CUDA build, and how to avoid it.

Only rule 5 touches the network, once, with a short timeout and no retries, so a
machine that cannot reach PyTorch's index never waits on it. Prints the pip arguments
(one per line) for ``pip install``, or ``keep``; the reason goes to stderr.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

PIN = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_S = 3.0


def find_links(environ: dict[str, str], pip_config: str) -> list[Path]:
    """Local folders pip takes wheels from: ``PIP_FIND_LINKS`` and ``pip config list``."""
    values = [environ.get("PIP_FIND_LINKS", "")]
    for line in pip_config.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("find-links"):
            values.append(value.strip().strip("'\""))
    out = []
    for value in values:
        for item in shlex.split(value):
            path = Path(item[len("file://") :] if item.startswith("file://") else item)
            if "://" not in item or item.startswith("file://"):
                out.append(path)
    return out


def has_cpu_wheel(folder: Path, pin: str = PIN) -> bool:
    return folder.is_dir() and any(folder.glob(f"torch-{pin}+cpu-*.whl"))


def probe(url: str = CPU_INDEX, timeout: float = PROBE_S) -> bool:
    """PyTorch's CPU index answers (one HEAD request, no retries)."""
    try:
        req = urllib.request.Request(f"{url}/torch/", method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status < 400
    except OSError:
        return False


def choose(
    installed: tuple[str, str | None] | None,
    environ: dict[str, str],
    pip_config: str,
    platform: str,
    reachable: Callable[[], bool],
    pin: str = PIN,
) -> tuple[list[str] | None, str]:
    """(pip arguments, or None to keep what is installed; the reason)."""
    if installed is not None:
        version, cuda = installed
        if version.split("+")[0] == pin and cuda is None:
            return None, f"torch {version} (CPU build) is already installed"
    for folder in find_links(environ, pip_config):
        if has_cpu_wheel(folder, pin):
            return [f"torch=={pin}+cpu"], f"the CPU wheel of torch {pin} lies in {folder}"
    if environ.get("LONGACT_TORCH_INDEX"):
        index = environ["LONGACT_TORCH_INDEX"]
        return ["--index-url", index, f"torch=={pin}+cpu"], f"LONGACT_TORCH_INDEX={index}"
    if not platform.startswith("linux"):
        return [f"torch=={pin}"], f"PyPI's torch {pin} is the CPU build on {platform}"
    if reachable():
        return ["--index-url", CPU_INDEX, f"torch=={pin}+cpu"], f"PyTorch's CPU index ({CPU_INDEX})"
    return [f"torch=={pin}"], (
        f"WARNING: neither a local CPU wheel nor {CPU_INDEX} is available, so torch {pin} "
        "comes from the configured indexes, which on Linux is the CUDA build (several GB). "
        "To avoid it, set LONGACT_TORCH_INDEX to a mirror of PyTorch's CPU index, or put "
        f"torch-{pin}+cpu-*.whl in a folder named by PIP_FIND_LINKS"
    )


def _installed(python: str) -> tuple[str, str | None] | None:
    code = "import torch; print(torch.__version__); print(torch.version.cuda or '')"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    version, cuda = (proc.stdout.splitlines() + ["", ""])[:2]
    return version.strip(), (cuda.strip() or None)


def main(argv: list[str]) -> int:
    python = argv[1] if len(argv) > 1 else sys.executable
    cfg = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    args, reason = choose(_installed(python), dict(os.environ), cfg, sys.platform, probe)
    print(f"[install] torch: {reason}", file=sys.stderr)
    print("keep" if args is None else "\n".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
