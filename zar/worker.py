"""A worker of ``zar study --jobs N``: one process per slot, training the children its study hands it in turn.

Importing torch, MLflow and scikit-learn takes about 6 s a process on the machines here, and each
child loaded the data again: a process per child paid that for every child. A worker pays it once
and trains each child exactly as ``zar train --parent-run`` would (a run of its own, under the
study's parent, from the config file the study wrote). The study writes one JSON line per child
to the worker's stdin; the worker prints the child's output, then ``DONE`` and a JSON line with
the child's error, if any. A child that fails does not stop the worker; Ctrl-C or SIGTERM ends
the child's run KILLED and the worker with it.
"""

from __future__ import annotations

import json
import sys

from . import tracking, training
from .config import load_config
from .errors import Interrupted, describe
from .learn.data import DataBundle, data_key, load_data
from .parallel import DONE


def serve(lines=sys.stdin) -> int:
    """Train each child a line of ``lines`` names, until they end; 0 once the study closes stdin."""
    data: dict[tuple, DataBundle] = {}
    for line in lines:
        task = json.loads(line)
        training.follow_thread_share()  # the share of the cores this child starts with
        error = None
        try:
            train_one(task, data)
        except Interrupted:
            raise  # its run is KILLED; so is the study
        except Exception as e:  # the child's run is FAILED already; the next child trains
            error = describe(e)
        print(DONE + json.dumps({"error": error}), flush=True)
    return 0


def train_one(task: dict, data: dict[tuple, DataBundle]) -> None:
    if task.get("resume"):
        training.resume(task["resume"], progress=False, continue_hint="its study resumes it")
        return
    cfg = load_config(task["params"])
    key = data_key(cfg)
    if key not in data:
        data[key] = load_data(cfg)
    result = training.train(
        task["model"], cfg, task["experiment"], progress=False, data=data[key], parent_run_id=task["parent"]
    )
    print(f"Run: {tracking.runs_url(result.experiment_id, result.run_id)}", flush=True)
