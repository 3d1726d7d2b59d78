"""The whole study: one parent run, one nested training run per model and seed (and, in an
ablation, per combination of the varied values: zar.ablation), one table grouped by those values.

A study continues after any interruption: the same command again (or ``zar study --resume
PARENT``) finds its unfinished parent by the hash of its settings, data and code, keeps the
children that FINISHED, resumes the others from their checkpoints, starts those never started,
and ends with one run per child and the table an uninterrupted study would have printed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from . import ablation, parallel, tracking, training
from . import slurm as zar_slurm
from .ablation import Child
from .analysis.comparison import comparison
from .analysis.study_table import log_report, log_table
from .analysis.table import DEFAULT_BASELINE, TableRow
from .analysis.verdicts import MIN_SEEDS, planned_looks
from .checks import check_study
from .config import ROLE, RUNTIME, TrainConfig, from_dict
from .errors import Interrupted, TrainingFailed, UserError, describe
from .learn.data import DataBundle, data_key, load_data
from .slurm import SlurmOptions
from .tracking import provenance, runs, views

CONTINUE_HINT = "run the same command again, or 'zar study --resume {run_id}', to continue it"


@dataclass
class StudyResult:
    run_id: str
    experiment_id: str
    table: list[TableRow]
    failures: list[str]


@dataclass(frozen=True)
class StudySpec:
    """What makes a study what it is: the same spec, on the same data, with the same code, is the same study."""

    models: list[str]
    seeds: list[int]
    cfg: TrainConfig  # resolved: the precision that runs, never 'auto'
    vary: dict[str, list]
    baseline: str | None
    data: list[str]  # the data fingerprint of each distinct data the children train on
    code: dict[str, str]  # zar's version and the git commit (provenance.RESUME_KEYS)
    until_decided: list | None = None  # [--max-seeds, --margin] of a study in rounds; None: every seed at once

    @property
    def key(self) -> str:
        settings = {**asdict(self), "cfg": {k: v for k, v in self.cfg.to_dict().items() if ROLE[k] != RUNTIME}}
        if self.until_decided is None:  # the key of every study started before rounds existed
            del settings["until_decided"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "cfg": self.cfg.to_dict()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudySpec:
        values = json.loads(text)
        return cls(**{**values, "cfg": from_dict(values["cfg"])})

    def changed(self, then: StudySpec) -> str | None:
        """What differs from the spec a study was started with, in words; None when nothing does."""
        for name, now, before in (("data fingerprint", self.data, then.data), ("code", self.code, then.code)):
            if now != before:
                return f"its {name} was {before}, now {now}"
        return None if self.key == then.key else "its settings differ"


def run_study(
    models: list[str],
    seeds: list[int],
    cfg: TrainConfig,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    baseline: str | None = "resnet",
    progress: bool = True,
    echo: Callable[[str], None] = training.print_line,
    jobs: int = 1,
    vary: dict[str, list] | None = None,
    resume_run_id: str | None = None,
    until_decided: tuple[int, float] | None = None,
    slurm: SlurmOptions | None = None,
) -> StudyResult:
    """Train every model with every seed (and every combination of ``vary``'s values) as children
    of one parent run, then report the table, grouped by the varied keys.

    ``baseline=None``: resnet when it is among ``models``, else no row is compared to another.
    ``jobs > 1`` trains up to that many children at once, each in a process of its own; with
    ``slurm``, each child is a Slurm job (zar.slurm) and ``jobs`` is unused. An
    unfinished study with the same settings, data and code is continued, not started again;
    ``resume_run_id`` names the study to continue (refused when its data or code changed).
    ``until_decided`` = (max seeds, margin): ``seeds`` is the first round; each round adds as many
    seeds to the comparisons still undecided, until each is decided or max seeds are spent.
    """
    vary = vary or {}
    check_study(models, baseline or default_baseline(models), seeds)
    planned = planned_seeds(seeds, until_decided, vary)
    # The parent records the precision its children run at, chosen for the threads each child gets.
    threads = slurm.cpus if slurm else parallel.child_threads(jobs)  # each child's torch threads
    cfg, _ = training.resolve(cfg, threads)
    # Every child's config, built and resolved now: a bad value or device fails before any run.
    kids = [
        Child(k.model, training.resolve(k.cfg, threads)[0], k.varied) for k in ablation.plan(models, planned, cfg, vary)
    ]
    _check_distinct(kids)
    data = _load_once(kids)
    code = {k: v for k, v in provenance.code_tags().items() if k in provenance.RESUME_KEYS}
    fingerprints = sorted({d.data_fingerprint for d in data.values()})
    spec = StudySpec(models, seeds, cfg, vary, baseline, fingerprints, code, list(until_decided or ()) or None)
    tracking.check_reachable()
    run_name = f"study-{len(models)}x{len(seeds)}" + (f"-vary-{'-'.join(vary)}" if vary else "")
    parent, continued = _parent(spec, experiment, run_name, resume_run_id)
    run_id = parent.info.run_id
    views.share_study_runs_view(parent.info.experiment_id, run_id, ["model", *vary])
    with runs.closing(
        run_id,
        {tracking.TAG_STUDY: "1", tracking.TAG_RUN_NAME: run_name, **provenance.code_tags()},
        continue_hint=CONTINUE_HINT.format(run_id=run_id),
    ):
        if not continued:
            tracking.log_params(run_id, _parent_params(spec, jobs))
        train = lambda todo: _train(todo, run_id, experiment, jobs, progress, echo, data, slurm)  # noqa: E731
        if until_decided:
            failures = _rounds(kids, spec, run_id, experiment, continued, train, echo)
        else:
            failures = train(_continue(kids, run_id, echo, slurm) if continued else kids)
        table = log_table(run_id, parent.info.experiment_id, models, baseline, echo, group_by=list(vary))
        if table:
            try:
                log_report(parent, table, echo)
            except Exception as e:  # the runs and the table are recorded: a page that fails must not fail them
                echo(f"Report not written: {describe(e)}; 'zar report --parent {run_id}' tries again")
        if failures:
            echo(f"{len(failures)} runs failed: {CONTINUE_HINT.format(run_id=run_id)} once their cause is fixed.")
            raise TrainingFailed(f"{len(failures)} of {len(kids)} runs failed: " + "; ".join(failures))
    return StudyResult(run_id, parent.info.experiment_id, table, failures)


def _load_once(kids: list[Child]) -> dict[tuple, DataBundle]:
    """Each distinct data the children train on, loaded once: a bad folder fails now, and images are decoded once."""
    data: dict[tuple, DataBundle] = {}
    for kid in kids:
        if data_key(kid.cfg) not in data:
            data[data_key(kid.cfg)] = load_data(kid.cfg)
    return data


def _parent_params(spec: StudySpec, jobs: int) -> dict:
    """What the parent records: the config less what it did not use itself (a varied key has no one
    value; the seed is the children's, so it records ``seeds``), and the study's own settings."""
    params = {k: v for k, v in spec.cfg.to_dict().items() if k not in spec.vary and k != "seed"}
    params.update(models=",".join(spec.models), seeds=",".join(map(str, spec.seeds)), jobs=jobs)
    if spec.vary:
        params["vary"] = ablation.describe(spec.vary)
    if spec.until_decided:  # what zar.analysis reads to judge the table by its sequential design
        max_seeds, margin = spec.until_decided
        params.update(round_seeds=len(spec.seeds), max_seeds=max_seeds, margin=margin)
    return params


def planned_seeds(seeds: list[int], until_decided: tuple[int, float] | None, vary: dict) -> list[int]:
    """Every seed a study may train: ``seeds``, or with --until-decided the next ones up to --max-seeds."""
    if not until_decided:
        return seeds
    max_seeds = until_decided[0]
    if vary:
        raise UserError("--until-decided judges architectures against a baseline; it takes no --vary")
    if len(seeds) < MIN_SEEDS or max_seeds < len(seeds):
        raise UserError(
            f"--until-decided needs a first round of at least {MIN_SEEDS} --seeds and --max-seeds at least as "
            f"many; got {len(seeds)} seeds, --max-seeds {max_seeds}"
        )
    return [*seeds, *range(max(seeds) + 1, max(seeds) + 1 + max_seeds - len(seeds))]


def _rounds(kids: list[Child], spec: StudySpec, run_id: str, experiment: str, continued: bool, train, echo) -> list:
    """Train in rounds: after each, the comparisons decided at that look (O'Brien–Fleming boundaries,
    zar.analysis.judging) stop; the baseline and the undecided ones get the next round's seeds."""
    max_seeds, margin = spec.until_decided
    order = planned_seeds(spec.seeds, (max_seeds, margin), {})
    baseline = spec.baseline or default_baseline(spec.models)
    active, trained = set(spec.models), set()
    for look in planned_looks(len(spec.seeds), max_seeds):
        seeds = {str(s) for s in order[:look]}
        todo = [k for k in kids if k.model in active and str(k.cfg.seed) in seeds and k.key not in trained]
        todo = _continue(todo, run_id, echo) if continued else todo
        failures = train(todo)
        if failures:
            return failures
        trained |= {k.key for k in todo}
        table = comparison(experiment, run_id, baseline=baseline, margin=margin).table
        decided = {r.model: r.verdict for r in table if r.verdict and not r.verdict.startswith("undecided")}
        active -= set(decided)
        undecided = sorted(active - {baseline})
        said = "; ".join(f"{m}: {v}" for m, v in decided.items() if m in {k.model for k in todo})
        echo(f"After {look} seeds a side: {said or 'none decided'}; undecided: {', '.join(undecided) or 'none'}")
        if not undecided:
            break
    return []


def _train(kids, run_id, experiment, jobs, progress, echo, data, slurm=None) -> list[str]:
    if slurm is not None:
        return zar_slurm.train_children(kids, run_id, experiment, slurm, echo)
    if jobs > 1:
        return parallel.train_children(kids, run_id, experiment, jobs, echo)
    return _train_in_process(kids, experiment, progress, echo, data, "its study resumes it")


def resume_study(
    run_id: str, progress: bool = True, jobs: int = 1, echo=training.print_line, slurm: SlurmOptions | None = None
) -> StudyResult:
    """Continue the study run ``run_id`` with the settings it was started with."""
    tracking.check_reachable(create=False)  # a folder with no store has no study to continue: make none
    run = tracking.get_run(run_id)
    if tracking.TAG_STUDY_SPEC not in run.data.tags:
        raise UserError(f"run {run_id} is not a zar study that can continue (no tag {tracking.TAG_STUDY_SPEC})")
    if run.info.status == tracking.FINISHED:
        raise UserError(f"study run {run_id} is already FINISHED; there is nothing to continue")
    spec = StudySpec.from_json(run.data.tags[tracking.TAG_STUDY_SPEC])
    experiment = tracking.experiment_name(run.info.experiment_id)
    until = tuple(spec.until_decided) if spec.until_decided else None
    return run_study(
        spec.models, spec.seeds, spec.cfg, experiment, spec.baseline, progress, echo, jobs, spec.vary, run_id, until,
        slurm,
    )  # fmt: skip


def _parent(spec: StudySpec, experiment: str, run_name: str, resume_run_id: str | None):
    """The study's parent run, and whether it continues an earlier attempt."""
    if resume_run_id is not None:
        run = tracking.get_run(resume_run_id)
        then = StudySpec.from_json(run.data.tags[tracking.TAG_STUDY_SPEC])
        changed = spec.changed(then)
        if changed:
            raise UserError(f"study run {resume_run_id} cannot continue: {changed}; start a new study instead")
        if run.info.status == tracking.RUNNING and runs.process_alive(run.data.tags) is not False:
            held_by = runs.holder(run.data.tags)
            raise UserError(f"study run {resume_run_id} is still running ({held_by}); wait for it or stop it")
        return runs.reopen(resume_run_id), True
    tags = {tracking.TAG_STUDY: "1", tracking.TAG_STUDY_SPEC: spec.to_json()}
    found = runs.find_or_start_parent(
        experiment, run_name, tracking.TAG_STUDY_KEY, spec.key, tags, reuse_finished=False
    )
    if found.holder is not None:
        raise UserError(
            f"the same study is running as run {found.run.info.run_id} ({found.holder}); wait for it or stop it"
        )
    return found.run, found.was is not None


def _continue(kids: list[Child], parent_run_id: str, echo, slurm: SlurmOptions | None = None) -> list[Child]:
    """The children still to train: each FINISHED one is kept and not trained again; an interrupted one
    with a checkpoint here is resumed; every other run of a child (none, or no checkpoint) is
    discarded, so that each child ends with exactly one run. Under Slurm, a child whose job an
    earlier attempt submitted and Slurm still queues or runs is attached to, not submitted again."""
    attached = zar_slurm.alive_jobs(parent_run_id) if slurm else {}
    runs.close_orphans(parent_run_id, tracking.KILLED)  # children whose process died with the study's
    by_key: dict[tuple, list] = {}
    for run in tracking.children(parent_run_id):
        if run.data.tags.get(tracking.TAG_SLURM_JOB) in attached.values():
            continue  # its job goes on
        if run.info.status == tracking.RUNNING:  # a child that outlived its study (it was killed outright)
            raise UserError(
                f"run {run.info.run_id} of study {parent_run_id} is still training ({runs.holder(run.data.tags)}); "
                "wait for it to end, then run this again"
            )
        by_key.setdefault(_run_key(run, kids), []).append(run)
    todo, kept = [], 0
    for kid in kids:
        if zar_slurm.child_key(kid) in attached:
            todo.append(replace(kid, job=attached[zar_slurm.child_key(kid)]))
            continue
        found = sorted(by_key.pop(kid.key, []), key=lambda r: r.info.start_time or 0, reverse=True)
        done = next((r for r in found if r.info.status == tracking.FINISHED), None)
        resumable = next((r for r in found if tracking.checkpoint_path(r).exists()), None)
        keep = done or resumable
        for run in found:
            if run is not keep:
                runs.discard(run.info.run_id)
        if done is not None:
            kept += 1
        else:
            todo.append(replace(kid, resume=keep.info.run_id if keep else None))
    resumed = sum(k.resume is not None for k in todo)
    echo(
        f"Continuing study run {parent_run_id}: {kept} of {len(kids)} runs finished before, "
        f"{resumed} to resume from their checkpoints, {len(todo) - resumed - len(attached)} to start"
        + (f", {len(attached)} still in Slurm's queue or running" if attached else "")
    )
    return todo


def _run_key(run, kids: list[Child]) -> tuple:
    """A child run's key as ``Child.key`` makes it, read from its tags and params."""
    params, varied = run.data.params, [k for k, _ in kids[0].varied] if kids else []
    return (run.data.tags.get(tracking.TAG_MODEL, ""), params.get("seed", ""), *(params.get(k, "") for k in varied))


def _check_distinct(kids: list[Child]) -> None:
    """Two varied values that resolve to one config ('auto' is fp32 here) would train one run twice and
    average it as two samples."""
    seen: dict[tuple, Child] = {}
    for kid in kids:
        first = seen.setdefault((kid.model, kid.cfg), kid)
        if first is not kid:
            differ = [f"{k}={a} and {k}={b}" for (k, a), (_, b) in zip(first.varied, kid.varied) if a != b]
            raise UserError(
                f"--vary: {', '.join(differ)} train the same run here ({first.label} and {kid.label} resolve "
                f"to one config, e.g. 'auto' to what this machine runs); drop one of the values"
            )


def default_baseline(models: list[str]) -> str:
    """What a study compares to when not told: resnet if it trains, else (for checks) its first model."""
    return DEFAULT_BASELINE if DEFAULT_BASELINE in models else models[0]


def _train_in_process(kids: list[Child], experiment, progress, echo, data: dict[tuple, DataBundle], hint) -> list[str]:
    failures = []
    for kid in kids:
        kid_data = data[data_key(kid.cfg)]
        try:
            if kid.resume:
                training.resume(kid.resume, progress, echo, data=kid_data, continue_hint=hint)
            else:
                training.train(kid.model, kid.cfg, experiment, progress, echo, data=kid_data, continue_hint=hint)
        except Interrupted:
            raise  # the parent ends KILLED too
        except Exception as e:  # the child is FAILED already; the study goes on without it
            message = describe(e)
            failures.append(f"{kid.label}: {message}")
            echo(f"{kid.label} failed: {message}")
    return failures
