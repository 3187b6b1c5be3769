"""Is LongAct's verl plugin loaded in this process? One question, asked before a run.

verl imports every ``verl.plugins`` entry point in each of its processes and logs a
failure at debug level only. A plugin that is missing or fails to import therefore
leaves verl's stock FSDP engine in place (no LongAct hook: the run would train plain RL)
and no ``cpu`` platform or ``hf`` rollout, with nothing on the console. ``longact-train``,
``longact doctor`` and the GPU and image checks call ``plugin_problem`` and stop with its
answer instead.
"""

from __future__ import annotations

import os

ENGINE = "LongActFSDPEngine"
GROUP = "verl.plugins"


def engine_key(device: str) -> str | tuple[str, str]:
    """verl's EngineRegistry key LongAct registers its engine under for ``device``."""
    return "cpu" if device == "cpu" else (device, "nvidia")


def plugin_problem(device: str = "cuda") -> str | None:
    """None when verl's FSDP2 engine for ``device`` is LongAct's; else why not, in one
    line with the fix. Imports verl (which loads the plugins) if it is not loaded yet."""
    import verl  # noqa: F401 - loads the verl.plugins entry points
    from verl.workers.engine.base import EngineRegistry

    key = engine_key(device)
    engines = EngineRegistry._engines.get("language_model", {}).get("fsdp2", {})
    # what verl would pick: the (device, vendor) entry first, then the device's own
    cls = engines.get(key) or engines.get(key[0] if isinstance(key, tuple) else key)
    have = getattr(cls, "__name__", None)
    if have == ENGINE:
        return None
    found = f"verl's FSDP2 engine for {key} is {have}, not LongAct's"
    policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    if policy == "none" or (policy != "auto" and "longact" not in policy.split(",")):
        return f"{found}: VERL_USE_EXTERNAL_PLUGINS={policy!r} keeps verl from loading it"
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group=GROUP) if ep.name == "longact"]
    if not eps:
        return (
            f"{found}: no 'longact' entry point in group {GROUP!r}, so LongAct is not "
            "installed as a package (only on a path); install it: pip install -e . "
            "(a checkout) or pip install longact"
        )
    try:
        eps[0].load()
    except Exception as e:  # noqa: BLE001 - this is the cause verl hid
        return f"{found}: its plugin {eps[0].value} fails to import: {type(e).__name__}: {e}"
    return f"{found}: its plugin {eps[0].value} imports, yet verl did not load it in this process"
