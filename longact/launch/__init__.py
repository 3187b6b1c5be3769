"""Launching LongAct runs on an existing Ray cluster (``longact submit``).

- ``runtime_env``: the job's entrypoint and runtime_env (working_dir with excludes,
  LongAct's package staged as a py_module, environment variables, upload-size check).

Nothing here imports Ray at package import time.
"""
