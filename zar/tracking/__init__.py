"""What talks to MLflow: the only folder of zar that imports it (tests/test_structure.py holds it to that).

- ``client``: every call to MLflow (store, runs, params, metrics, tags, artifacts, models), and
  MLflow's tag names and run states as constants. Outside this folder it is read as
  ``zar.tracking.X``: ``from zar import tracking; tracking.log_metrics(...)``.
- ``runs``: a run's life: started, adopted from ``mlflow run``, reopened, closed FINISHED,
  FAILED or KILLED, never left RUNNING; a study's or sweep's parent found or started.
- ``store``: where runs go, checked without importing MLflow (a dead server is reported in a second).
- ``provenance``: the code a run ran (versions, git commit), tagged and checked on resume.
- ``views``: the runs-table views zar saves (its columns; a study's runs by architecture) and their links.
"""

from __future__ import annotations

import importlib

SUBMODULES = ("client", "runs", "store", "provenance", "views")


def __getattr__(name: str):
    # zar.tracking.X is zar.tracking.client.X, loaded on first use: MLflow takes seconds to import,
    # and the command line reads zar.tracking.store long before it knows it needs MLflow.
    if name in SUBMODULES or name.startswith("__"):  # the import system asks before it loads a submodule
        raise AttributeError(f"module 'zar.tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(".client", __name__), name)
    globals()[name] = value
    return value
