"""The life of a tune experiment directory: new, resumed, or overwritten — never silently reused or destroyed.

An experiment *exists* when its directory holds ``experiment.json`` or its Optuna study is already in the
storage. Then tuning needs ``resume`` (continue it: Tune's state in ``<exp>/tune`` and the study) or
``overwrite`` (delete the directory's kcpt files and the study, start again); neither is an
:class:`~kcpt.errors.InputError` naming both flags. Ray-free (only Optuna): the CLI checks before importing Ray.

An experiment directory may be a URI (``s3://bucket/experiments``): the driver works in a node-local mirror of
its small files (:data:`SMALL_FILES`: the manifest, config, exports and a SQLite/journal study), pulled before the
run and published after every finished trial and at the end; Ray Tune keeps its own state at ``<uri>/tune`` and
the trials' run directories are ``<uri>/runs/<trial>``. A study shared by several drivers at once needs a
database URL (``tune.storage``); the published SQLite file is a snapshot for one driver at a time.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kcpt import storage as store_lib
from kcpt.config import KcptConfig
from kcpt.errors import InputError
from kcpt.tune.study_storage import delete_study, existing_study, redact, resolve_storage, study_exists

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

#: What kcpt writes into an experiment directory (``--overwrite`` removes exactly these).
EXPERIMENT_ENTRIES = ("experiment.json", "config.yaml", "optuna.db", "optuna.journal", "optuna.journal.lock",
                      "tune", "runs", "trials.parquet", "best_config.yaml", "best_trial.json")

Mode = Literal["new", "resume", "overwrite"]

SMALL_FILES = ("experiment.json", "config.yaml", "optuna.db", "optuna.journal", "trials.parquet", "best_config.yaml",
               "best_trial.json")
"""What a URI experiment's mirror pulls and publishes (everything else lives at the URI only)."""


def mirror_of(exp: str | Path) -> Path:
    """The local directory of an experiment: itself, or (a URI) its node-local mirror with the small files pulled
    fresh from the URI."""
    if not store_lib.is_uri(str(exp)):
        return Path(exp)
    uri = str(exp).rstrip("/")
    store_lib.check_uri(uri, "experiment directory")
    local = store_lib.local_path_for(uri)
    local.mkdir(parents=True, exist_ok=True)
    remote = store_lib.Store(uri)
    for name in SMALL_FILES:
        if remote.is_file(name):
            remote.download_file(name, local / name)
        else:
            (local / name).unlink(missing_ok=True)
    return local


def publish_experiment(uri: str | None, local: Path) -> None:
    """Upload the mirror's small files to the experiment's URI (no-op for a local experiment)."""
    if uri is None:
        return
    remote = store_lib.Store(uri)
    for name in SMALL_FILES:
        if (local / name).is_file():
            remote.upload_file(local / name, name)


class Publisher:
    """``publish_experiment`` of a URI experiment from this node's mirror (:func:`mirror_of`), as a picklable
    callable: Tune saves the searcher that holds it, and a driver that restores it elsewhere publishes from its
    own mirror."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __call__(self) -> None:
        publish_experiment(self.uri, store_lib.local_path_for(self.uri))


def absolute_paths(cfg: KcptConfig) -> KcptConfig:
    """A copy with every relative path made absolute against the current directory: trials run in their own
    working directories (and, on a cluster, on other nodes), so ``prepared_root``, ``output_dir``, the
    experiment dir and local dataset inputs must not depend on the cwd."""
    from kcpt.config import config_from_dict

    d = cfg.model_dump(mode="json")

    def absolute(v: str) -> str:
        return v if store_lib.is_uri(v) else str(Path(v).resolve())

    d["data"]["prepared_root"] = absolute(d["data"]["prepared_root"])
    d["train"]["output_dir"] = absolute(d["train"]["output_dir"])
    d["tune"]["experiment_dir"] = absolute(d["tune"]["experiment_dir"])
    for ds in d["data"]["datasets"].values():
        ds["inputs"] = [i if ":" in i.split("/")[0] or Path(i).is_absolute() else str(Path(i).resolve())
                        for i in ds["inputs"]]
    for key in ("name_or_path",):
        v = d["model"][key]
        if v != "tiny" and Path(v).exists():
            d["model"][key] = str(Path(v).resolve())
    v = d["tokenizer"]["path"]
    if v != "demo" and Path(v).exists():
        d["tokenizer"]["path"] = str(Path(v).resolve())
    return config_from_dict(d, "<absolute paths>")


def default_experiment_dir(cfg: KcptConfig) -> Path | str:
    """``<tune.experiment_dir>/<study_name>-<experiment hash8>`` (``cfg`` with absolute paths; a URI stays one):
    :meth:`~kcpt.config.KcptConfig.experiment_sha256`, so ``--num-samples`` names the same experiment. A local
    experiment made before that hash (named by :meth:`~kcpt.config.KcptConfig.sha256`) keeps its name."""
    name = f"{cfg.tune.study_name}-{cfg.experiment_sha256()[:8]}"
    if store_lib.is_uri(cfg.tune.experiment_dir):
        return store_lib.join(cfg.tune.experiment_dir, name)
    root = Path(cfg.tune.experiment_dir).resolve()
    legacy = root / f"{cfg.tune.study_name}-{cfg.sha256()[:8]}"
    if not (root / name).exists() and (legacy / "experiment.json").is_file():
        return legacy
    return root / name


def experiment_uri(cfg: KcptConfig, experiment_dir: str | Path | None = None) -> str | None:
    """The experiment's URI when it lives in an object store, else None (``cfg`` with absolute paths)."""
    ref = str(experiment_dir) if experiment_dir else str(default_experiment_dir(cfg))
    return ref.rstrip("/") if store_lib.is_uri(ref) else None


def resolve_experiment(cfg: KcptConfig, experiment_dir: str | Path | None = None
                       ) -> tuple[KcptConfig, Path, str]:
    """``(cfg with absolute paths, experiment dir, Optuna storage URL)`` of a tune run. For a URI experiment the
    directory is its local mirror (:func:`mirror_of`, small files pulled) and a default SQLite/journal study
    lives there."""
    cfg = absolute_paths(cfg)
    uri = experiment_uri(cfg, experiment_dir)
    if uri is not None:
        exp_dir = mirror_of(uri)
    else:
        exp_dir = Path(experiment_dir).resolve() if experiment_dir else Path(default_experiment_dir(cfg))
    return cfg, exp_dir, resolve_storage(cfg.tune.storage, exp_dir)


def check_experiment_dir(exp_dir: Path) -> None:
    """The experiment directory must be absent, empty, or a kcpt tune experiment (``experiment.json``): tuning
    writes ``config.yaml``, ``best_config.yaml``, ... there and must never overwrite a user's files."""
    if not exp_dir.exists():
        return
    if not exp_dir.is_dir():
        raise InputError("experiment directory exists and is not a directory; choose another --experiment-dir",
                         path=str(exp_dir))
    if (exp_dir / "experiment.json").is_file() or next(exp_dir.iterdir(), None) is None:
        return
    raise InputError("exists but is not a kcpt tune experiment (no experiment.json); kcpt writes only into its own "
                     "experiment directories: choose another --experiment-dir or move it away", path=str(exp_dir))


TUNE_RUN_NAME = "tune"
"""The directory of an experiment's first Ray Tune run (:func:`tune_run_name`)."""

OWNER_ATTR = "experiment"
"""Optuna user attribute naming the experiment (its directory or URI) that asked for a trial: a study shared by
several experiments (``--storage`` + ``--study-name``) tells each its own trials."""


def _owned(t: FrozenTrial, owner: str | None) -> bool:
    """Whether trial ``t`` belongs to experiment ``owner`` (every trial when None; a trial of an older kcpt, without
    the attribute, to whichever experiment asks)."""
    return owner is None or t.user_attrs.get(OWNER_ATTR, owner) == owner


def other_experiments(storage_url: str, study_name: str, owner: str) -> list[str]:
    """The other experiments whose trials the study holds (by :data:`OWNER_ATTR`)."""
    study = existing_study(storage_url, study_name)
    if study is None:
        return []
    return sorted({str(t.user_attrs[OWNER_ATTR]) for t in study.get_trials(deepcopy=False)
                   if OWNER_ATTR in t.user_attrs and t.user_attrs[OWNER_ATTR] != owner})


def experiment_exists(exp_dir: Path, storage_url: str, study_name: str) -> bool:
    return (exp_dir / "experiment.json").is_file() or study_exists(storage_url, study_name)


def previous_config(exp_dir: Path) -> KcptConfig | None:
    """The config the experiment last ran with (its ``config.yaml``), or None when absent or unreadable."""
    from kcpt.config import load_config
    from kcpt.errors import KcptError

    if not (exp_dir / "config.yaml").is_file():
        return None
    try:
        return load_config(exp_dir / "config.yaml")
    except KcptError:
        return None


def _config_changes(before: KcptConfig | None, config: KcptConfig | None) -> str:
    """``: key: old → new; …`` between the experiment's config and ``config`` outside what a resume may change
    (empty when unknown)."""
    from kcpt.config import SEARCH_BUDGET_KEYS, SHA256_IGNORED, config_changes

    if config is None or before is None:
        return ""
    changes = config_changes(before, config, ignore=SHA256_IGNORED + SEARCH_BUDGET_KEYS)
    return f" (changed: {'; '.join(changes)})" if changes else ""


def _check_same_experiment(exp_dir: Path, storage_url: str, config_sha256: str | None,
                           config: KcptConfig | None = None) -> None:
    """A resume must find the experiment's storage and config; of the config it may change only
    :data:`~kcpt.config.SEARCH_BUDGET_KEYS`, and ``tune.num_samples`` only upwards. With ``config`` the check
    compares :meth:`~kcpt.config.KcptConfig.experiment_sha256` (the manifest's, else that of its ``config.yaml``);
    without, the manifest's ``config_sha256`` must equal ``config_sha256``."""
    path = exp_dir / "experiment.json"
    if not path.is_file():
        return
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot resume: not valid JSON ({e})", path=str(path)) from None
    if m.get("storage") not in (None, storage_url):
        raise InputError(f"cannot resume: the experiment's study is in {redact(str(m['storage']))}, not in "
                         f"{redact(storage_url)}: pass the same --storage / tune.storage", path=str(path))
    before = previous_config(exp_dir)
    if config is not None and (m.get("experiment_sha256") or before is not None):
        recorded = m.get("experiment_sha256") or before.experiment_sha256()  # type: ignore[union-attr]
        same = recorded == config.experiment_sha256()
    else:
        same = not config_sha256 or m.get("config_sha256") in (None, config_sha256)
    if not same:
        raise InputError(f"cannot resume with another config{_config_changes(before, config)}: resume with the one "
                         f"the experiment was started with (--config {exp_dir / 'config.yaml'}, and no --set or flag "
                         "that changes it; a resume may change only tune.num_samples — more trials —, "
                         "tune.max_concurrent, tune.num_cpus and tune.reeval), or --overwrite", path=str(path))
    if config is not None and before is not None and config.tune.num_samples < before.tune.num_samples:
        raise InputError(f"cannot resume with fewer trials: the experiment asked for {before.tune.num_samples} "
                         f"(tune.num_samples), this run for {config.tune.num_samples}; a resume can only add trials: "
                         f"pass --num-samples {before.tune.num_samples} or more", path=str(path))


def check_experiment(exp_dir: Path, *, storage_url: str, study_name: str, resume: bool = False,
                     overwrite: bool = False, config_sha256: str | None = None, owner: str | None = None,
                     config: KcptConfig | None = None) -> Mode:
    """Refuse to reuse an existing experiment without ``resume`` / ``overwrite``; returns what the run will do
    (``"resume"`` of an experiment that does not exist yet starts it: ``"new"``). A resume must use the
    experiment's storage and config (``config_sha256``, when given; ``config``: its changed keys are named). ``owner``
    (the experiment's directory or
    URI): a study that holds other experiments' trials is shared — joined with ``resume``, never deleted by
    ``overwrite``. Changes nothing."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other", path=str(exp_dir))
    check_experiment_dir(exp_dir)
    if not experiment_exists(exp_dir, storage_url, study_name):
        return "new"
    others = other_experiments(storage_url, study_name, owner) if owner else []
    if resume:
        _check_same_experiment(exp_dir, storage_url, config_sha256, config)
        return "resume"
    if overwrite:
        if others:
            raise InputError(f"--overwrite would delete study '{study_name}' in {redact(storage_url)}, which also "
                             f"holds the trials of {', '.join(others)}: choose another --study-name, or delete the "
                             "study yourself (optuna delete-study) if those trials may go", path=str(exp_dir))
        return "overwrite"
    if not (exp_dir / "experiment.json").is_file():
        raise InputError(f"study '{study_name}' in {redact(storage_url)} already exists"
                         + (f" (trials of {', '.join(others)})" if others else "")
                         + ": pass --resume to add this experiment's trials to it (a shared study), or choose another "
                         "--study-name", path=str(exp_dir))
    raise InputError(f"a tune experiment already exists here (study '{study_name}' in {redact(storage_url)}): "
                     "pass --resume to continue it, or --overwrite to delete its trials and study and start again",
                     path=str(exp_dir))


def tune_run_name(index: int) -> str:
    """Name of an experiment's ``index``-th Tune run (its directory under the experiment): ``tune``, then
    ``tune-2``, … — one more each time a resume raises ``tune.num_samples`` (Tune cannot add trials to a restored
    run)."""
    return TUNE_RUN_NAME if index == 0 else f"{TUNE_RUN_NAME}-{index + 1}"


def tune_runs(exp_dir: Path, previous: KcptConfig | None) -> list[dict[str, Any]]:
    """The experiment's Tune runs so far, ``[{"name", "num_samples"}, …]`` from its manifest (an experiment made
    before runs were listed had one: ``tune``, of its config's ``num_samples``); [] when it has no manifest."""
    path = exp_dir / "experiment.json"
    if not path.is_file():
        return []
    runs = json.loads(path.read_text(encoding="utf-8")).get("tune_runs")  # check_experiment read it
    if runs is None:
        return [{"name": TUNE_RUN_NAME, "num_samples": previous.tune.num_samples if previous else 0}]
    return [dict(r) for r in runs]


def added_tune_runs(exp_dir: Path) -> list[str]:
    """The directories of the Tune runs a resume added (:func:`tune_runs`' names of :func:`tune_run_name`'s form
    ``tune-N``, whatever else the manifest says; an entry or a manifest that cannot be read names none)."""
    try:
        runs = json.loads((exp_dir / "experiment.json").read_text(encoding="utf-8")).get("tune_runs") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [str(r.get("name")) for r in runs
            if isinstance(r, dict) and re.fullmatch(rf"{TUNE_RUN_NAME}-\d+", str(r.get("name")))]


def clear_experiment(exp_dir: Path, *, storage_url: str, study_name: str, uri: str | None = None) -> None:
    """``--overwrite``: delete the study from its storage and kcpt's files from the experiment directory (and,
    with ``uri``, from the object store)."""
    names = [*EXPERIMENT_ENTRIES, *added_tune_runs(exp_dir)]  # read before experiment.json goes
    delete_study(storage_url, study_name)
    if uri is not None:
        remote = store_lib.Store(uri)
        for name in names:
            remote.delete(name)
            remote.delete_tree(name)
    for name in names:
        p = exp_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def accounted_trials(storage_url: str, study_name: str, owner: str | None = None) -> int:
    """Trials of the study (with ``owner``: of that experiment) that a Tune trial ran to its end: COMPLETE,
    PRUNED, or FAIL from an error — not those :func:`fail_interrupted_trials` marked (no Tune trial ran them).
    What a grown ``tune.num_samples`` is counted against."""
    from optuna.trial import TrialState

    study = existing_study(storage_url, study_name)
    if study is None:
        return 0
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(_owned(t, owner) and not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))
               for t in study.get_trials(deepcopy=False, states=ended))


def fail_interrupted_trials(storage_url: str, study_name: str, owner: str | None = None) -> list[int]:
    """Mark the study's RUNNING trials (with ``owner``: that experiment's; another driver's trials of a shared
    study run on) FAIL with ``interrupted=True`` and return their numbers. Called when the tune run is over: a
    trial of this experiment still RUNNING then belongs to no live Tune trial (its driver was killed after asking
    Optuna for it and before Tune saved its state)."""
    import optuna
    from optuna.trial import TrialState

    study = existing_study(storage_url, study_name)
    if study is None:
        return []
    numbers = []
    for t in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        if not _owned(t, owner):
            continue
        trial = optuna.trial.Trial(study, t._trial_id)
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        numbers.append(t.number)
    return numbers
