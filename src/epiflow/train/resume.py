"""Where a pretraining run keeps its resumable state, and what happens to it across kills.

* The training state (``train_state.pt``) lives in ``--out`` by default, or in ``--state-dir`` (the
  workflow keeps it in ``<results>/pretrain_state/``, outside the rule's declared outputs, so that
  Snakemake's ``--rerun-incomplete`` does not delete it before the job restarts).
* A run started without ``--resume`` into a folder that already holds a state is refused (the earlier
  run would be overwritten without a word). ``--resume`` continues it; with ``--restart-if-changed``
  (what the workflow passes) a state whose settings differ from this run's is set aside as
  ``train_state.pt.previous`` and the run starts afresh, with a warning naming the changed settings.
  Without it, changed settings are an error. The comparison uses a hash of the settings that define
  the run (:data:`PretrainConfig.RESUME_KEYS`), stored in the state.
* Kills can leave the temporary files of atomic writes (``.train_state.pt.XXXXXXXX.tmp.pt``);
  :func:`clean_stale_temps` removes them when a run starts.
* :class:`StopSignals`: SIGUSR1 / SIGTERM (SLURM's warning before the time limit, or its
  termination signal) ask the loop to save a state at the end of the current step and stop;
  the CLI then exits with status 128 + signal, and the next submission resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import signal
import threading
from pathlib import Path

from ..errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
#: atomic_path temporaries ".<name>.<8 random chars>.tmp<suffix>" (files or folders), and the temp folder
#: of save_epiagent_checkpoint ".checkpoint.pth.<8 random chars>"
_TMP_RE = re.compile(r"^(\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?|\.checkpoint\.pth\.[A-Za-z0-9_]{8})$")


class TrainingInterrupted(Exception):
    """Raised after a state was saved because a stop signal arrived (see :class:`StopSignals`)."""

    def __init__(self, signum: int, step: int, state_path):
        self.signum, self.step, self.state_path = int(signum), int(step), str(state_path)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        super().__init__(f"stopped by {name} after step {step}; state saved to {state_path}")


def state_path(out_dir, state_dir=None) -> Path:
    return Path(state_dir if state_dir else out_dir) / STATE_NAME


def clean_stale_temps(*folders) -> list[str]:
    """Remove leftovers of interrupted atomic writes (``.NAME.XXXXXXXX.tmp.SFX``) in ``folders``."""
    removed = []
    for d in folders:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if _TMP_RE.match(p.name):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                 ", ".join(sorted(removed)[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


def run_settings(cfg_dict: dict, keys) -> dict:
    return {k: cfg_dict.get(k) for k in keys}


def config_hash(cfg_dict: dict, keys) -> str:
    """sha256 (16 hex digits) of the settings that define a run (data order, model, schedule)."""
    text = json.dumps(run_settings(cfg_dict, keys), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _peek(path: Path) -> dict:
    import torch

    try:
        st = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read the training state ({str(exc).strip().splitlines()[0][:200]})",
                              path=str(path), fix="delete it to start from scratch, or restore a complete "
                                                  "copy") from None
    return st if isinstance(st, dict) else {}


def renamed_settings(cfg_dict: dict, former=None) -> dict:
    """``cfg_dict`` with the settings stored under a former name (``former``: old -> new key, e.g.
    ``max_cells`` -> ``max_batch_cells``) under their name now: a state written before a rename."""
    out = dict(cfg_dict)
    for old, new in (former or {}).items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def settings_diff(old: dict, new: dict, keys) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_state(path: Path, cfg_dict: dict, keys, *, resume: bool, restart_if_changed: bool,
                  may_move: bool = True, data: dict | None = None, former: dict | None = None) -> bool:
    """Decide, before any work, what to do with an existing state at ``path``; returns whether to
    load it. Refuses to overwrite a state without ``resume``; with ``restart_if_changed`` a state of
    other settings (or, ``data``, of another corpus: n_ccres, vocab_id, n_cells) is moved to
    ``<path>.previous`` (the run starts afresh). ``former``: former setting names (old -> new key) that a
    state written before a rename stores (:func:`renamed_settings`); the same values under the old
    name are the same settings."""
    path = Path(path)
    if not path.exists():
        if resume:
            log.info("--resume: no training state at %s yet; starting from scratch", path)
        return False
    st = _peek(path)
    step = st.get("step", "?")
    total = (st.get("config") or {}).get("max_steps")
    if not resume:
        raise ConfigError(
            f"{path.parent} already holds the training state of an earlier run (step {step}"
            f"{'' if total is None else f' of at most {total}'}); starting again would overwrite it",
            path=str(path), field="resume",
            fix="pass --resume to continue that run, or give a fresh --out folder (or delete "
                f"{path.name} to start over)")
    stored = st.get("config") or {}
    old_cfg = renamed_settings(stored, former)
    new_hash = config_hash(cfg_dict, keys)
    # a renamed setting changes the stored hash's words, not the run: the hash of the renamed settings
    old_hash = (st.get("config_hash") if old_cfg == stored else None) or config_hash(old_cfg, keys)
    data_diff = [f"corpus {k} {st.get(k)!r} -> {v!r}" for k, v in (data or {}).items()
                 if k in st and st.get(k) != v]
    if old_hash == new_hash and not data_diff:
        return True
    diff = settings_diff(old_cfg, cfg_dict, keys) + data_diff
    if restart_if_changed:
        prev = path.with_name(path.name + ".previous")
        if may_move:
            path.replace(prev)
        log.warning("the training state at %s (step %s) was made with other settings (%s): set aside as "
                    "%s; starting afresh", path, step, "; ".join(diff) or "settings hash differs", prev.name)
        return False
    raise CheckpointError("cannot resume exactly: settings or corpus differ from the interrupted run: "
                          + (", ".join(diff) or f"settings hash {old_hash} -> {new_hash}"),
                          path=str(path), fix="resume with the original settings (see its config), or "
                                              "use a new --out folder")


def restore_metrics(out_dir, st: dict, step: int) -> None:
    """Put back ``metrics.csv`` (rows up to ``step``) from the state when the output folder lost it
    (e.g. Snakemake deleted the outputs of an incomplete job) or holds fewer rows."""
    text = st.get("metrics_csv")
    if not text:
        return
    p = Path(out_dir) / "metrics.csv"
    have = 0
    if p.exists():
        try:
            have = max(0, sum(1 for _ in open(p)) - 1)
        except OSError:
            have = 0
    if have >= step:
        return
    from ..io import atomic_write_text

    atomic_write_text(p, text)
    log.info("restored %s from the training state (%d steps)", p, step)


def metrics_text(out_dir) -> str | None:
    p = Path(out_dir) / "metrics.csv"
    try:
        return p.read_text() if p.exists() else None
    except OSError:
        return None


def stop_requested(stop: "StopSignals", info=None) -> bool:
    """Whether any rank received a stop signal (all ranks agree, so that all stop at the same step)."""
    flag = bool(stop.signum)
    if info is not None and getattr(info, "enabled", False):
        import torch

        from . import distributed as D

        t = torch.tensor([float(stop.signum)], device=info.device)
        D.all_reduce_sum(t, info)
        if float(t) > 0 and not stop.signum:
            stop.signum = int(signal.SIGTERM)
        flag = float(t) > 0
    return flag


class StopSignals:
    """Context manager: SIGUSR1 and SIGTERM set :attr:`signum` instead of killing the process, so that
    the training loop can save a state at the end of the step and stop (:class:`TrainingInterrupted`).
    A second signal of the same kind while saving restores the default action (dies at once).
    Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum:
            signal.signal(signum, signal.SIG_DFL)
        self.signum = signum
        log.warning("received %s: saving the training state at the end of this step, then stopping",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False
