"""A sweep's trials and ``--seeds`` reruns as Slurm jobs (``zar sweep --launcher slurm``).

The process that starts the sweep holds its parent run and trains nothing: it submits workers,
each a Slurm job running the same sweep (``zar sweep`` with the sweep's own settings), which finds
the parent held and joins it as any worker does, taking trials from the Optuna storage until none
is left. Once they end (and a worker that died has had its trial run again by another round), the
parent reports the best trials; each ``--seeds`` rerun is then a Slurm job of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from . import tracking
from .analysis import trials
from .config import to_yaml
from .slurm import SlurmOptions, Task, jobs_folder, run_jobs, zar_command
from .space import as_dict
from .sweep import Search, counts, wait_for_workers

ROUNDS = 3  # rounds of workers at most: a round whose worker died leaves trials for the next
STORAGE_ENV = "ZAR_OPTUNA_STORAGE"  # how workers get the storage URL: never in a job's files


@dataclass(frozen=True)
class SlurmLauncher:
    options: SlurmOptions
    storage: str  # the sweep's Optuna storage URL, absolute

    def search(self, s: Search) -> list[str]:
        """Rounds of worker jobs until every architecture has its trials; their failures are the trials'."""
        folder = jobs_folder(self.options, s.parent_id)
        (folder / "sweep.yaml").write_text(to_yaml(s.spec.cfg))  # as given: each worker resolves 'auto' itself
        (folder / "space.yaml").write_text(yaml.safe_dump(as_dict(s.spec.space), sort_keys=False))
        workers = self.options.max_jobs or 1
        before = os.environ.get(STORAGE_ENV)
        os.environ[STORAGE_ENV] = self.storage  # sbatch hands the jobs this process's environment
        try:
            for round_ in range(1, ROUNDS + 1):
                tasks = [
                    Task(f"sweep worker {i}", f"worker-{round_}-{i}", self._worker(s, folder), by_job=True)
                    for i in range(1, workers + 1)
                ]
                run_jobs(tasks, s.parent_id, self.options, s.echo)
                wait_for_workers(s)
                if not _trials_left(s):
                    break
        finally:
            if before is None:
                os.environ.pop(STORAGE_ENV, None)
            else:
                os.environ[STORAGE_ENV] = before
        return []  # each trial's failure is in Optuna and the table; a worker's own is echoed

    def _worker(self, s: Search, folder) -> list[str]:
        spec = s.spec
        args = ["sweep", "--no-progress", "--models", ",".join(spec.models), "--space", str(folder / "space.yaml")]
        args += ["--trials", str(spec.trials), "--method", spec.method, "--startup-trials", str(spec.startup_trials)]
        args += ["--params", str(folder / "sweep.yaml"), "--experiment", spec.experiment]
        return zar_command(*args, threads=self.options.cpus)

    def rerun_best(self, s: Search, best: trials.BestTrials) -> list[str]:
        """Each architecture's best configuration, once per seed, as a Slurm job (done ones skipped)."""
        folder = jobs_folder(self.options, s.parent_id)
        tasks = []
        for row in best.rows:
            if row.trial is None:
                continue  # no trial of this architecture finished
            study = s.studies[row.model]
            rerun_of = f"{study.study_name}/{row.trial}"
            done = trials.seeds_rerun(best.parent_run_id, rerun_of)
            for seed in s.spec.seeds:
                if str(seed) in done:
                    continue
                params = folder / f"{row.model}-best-seed{seed}.yaml"
                params.write_text(to_yaml(s.cfg.replace(**study.trials[row.trial].params, seed=seed)))
                args = ["train", "--no-progress", "--model", row.model, "--params", str(params)]
                args += ["--experiment", s.spec.experiment, "--parent-run", s.parent_id]
                args += ["--tag", f"{tracking.TAG_RERUN_OF}={rerun_of}"]
                args += ["--tag", f"{tracking.TAG_RUN_NAME}={row.model}-best-seed{seed}"]
                label = f"{row.model} best (trial {row.trial}) seed {seed}"
                tasks.append(Task(label, f"rerun-{row.model}-{seed}", zar_command(*args, threads=self.options.cpus)))
        return run_jobs(tasks, s.parent_id, self.options, s.echo) if tasks else []


def _trials_left(s: Search) -> bool:
    return any(sum(counts(t) for t in study.get_trials(deepcopy=False)) < s.spec.trials for study in s.studies.values())
