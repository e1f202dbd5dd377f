"""One isolated virtual environment per baseline tool, built from ``envs/baseline-<tool>.yaml``.

The env files are conda specs (``snakemake --sdm conda`` builds them as they are). Without conda,
:func:`ensure_env` builds an equivalent plain virtual environment (its own site-packages; no access
to the main environment's packages) from the file's ``pip:`` list:

1. ``<cache>/<tool>-<hash>/`` where ``hash`` is the SHA-256 of the env file (first 12 hex digits),
   of its lock and post-deploy script (if any) plus the Python version, so editing any of them builds
   a new environment; ``cache`` is the
   ``cache`` argument, else ``$EPIFLOW_ENV_CACHE``, else ``~/.cache/epiflow/envs``;
2. built in a temporary folder beside it (``python -m venv --without-pip``; packages installed by
   the main environment's pip with ``pip --python <env python>``): when ``envs/baseline-<tool>.lock.txt``
   exists (written with the yaml's pip list by ``bash scripts/lock.sh <tool>`` from
   ``envs/baseline-<tool>.in``), every package of it at its exact version with its sha256 checked
   (``--require-hashes --no-deps``), else the yaml's pip list as it is; then ``torch==2.13.0`` when the
   list holds it (the only torch allowed: a local CPU wheel; it is not in the lock); then, when
   ``envs/baseline-<tool>.post-deploy.sh`` exists, that script (the file Snakemake itself runs after
   creating a conda env from the yaml, inside the activated env) with ``bash``, the env's ``bin`` first
   on ``PATH`` and ``$EPIFLOW_PIP`` set to a pip command that installs into the env (the script
   falls back to ``python -m pip`` under conda): the place for steps a requirements list cannot
   express (``pip install --no-deps`` of a tool whose declared pins cannot be met on Python 3.11,
   a build from a patched source distribution). The folder is renamed into place only when
   everything installed, with ``epiflow-env.json`` (the spec, ``pip freeze``, build seconds)
   inside. A lock file serialises concurrent builds of the same env;
3. :func:`run_in_venv` writes the AnnData to an h5ad, runs ``python -m epiflow.baselines.runner``
   with the env's Python, only ``epiflow``'s own source on ``PYTHONPATH`` (a folder holding a
   link to the package) and ``PYTHONHASHSEED`` pinned (``TOOL_HASH_SEED``: a tool that iterates over a
   set of strings, as SnapATAC2's ``mnc_correct`` does over the batch labels, gives the same result
   in every run), and reads the ``.npz`` output back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, EpiflowError

log = logging.getLogger(__name__)

TORCH_SPEC = "torch==2.13.0"
DEFAULT_TIMEOUT = 1800
# the hash seed of every tool process (run_in_venv): the same input and parameters give the same output
TOOL_HASH_SEED = "0"


def repo_envs_dir() -> Path:
    """``envs/`` of the source checkout holding this package."""
    return Path(__file__).resolve().parents[3] / "envs"


def default_cache() -> Path:
    return Path(os.environ.get("EPIFLOW_ENV_CACHE") or Path.home() / ".cache" / "epiflow" / "envs")


@dataclass(frozen=True)
class EnvSpec:
    tool: str
    path: Path
    pip: tuple[str, ...]
    digest: str
    post_deploy: Path | None = None
    lock: Path | None = None

    @property
    def needs_torch(self) -> bool:
        return any(_req_name(r) == "torch" for r in self.pip)

    def env_dir(self, cache: Path) -> Path:
        return Path(cache) / f"{self.tool}-{self.digest}"


def _req_name(req: str) -> str:
    import re

    return re.split(r"[\s<>=!~\[;@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def env_file(tool: str, envs_dir=None) -> Path:
    return Path(envs_dir or repo_envs_dir()) / f"baseline-{tool}.yaml"


def post_deploy_file(tool: str, envs_dir=None) -> Path:
    """``envs/baseline-<tool>.post-deploy.sh`` (Snakemake's name for a conda env's post-deploy script)."""
    return Path(envs_dir or repo_envs_dir()) / f"baseline-{tool}.post-deploy.sh"


def lock_file(tool: str, envs_dir=None) -> Path:
    """``envs/baseline-<tool>.lock.txt``: the env's packages, exact versions and sha256 hashes."""
    return Path(envs_dir or repo_envs_dir()) / f"baseline-{tool}.lock.txt"


def read_env_spec(tool: str, envs_dir=None) -> EnvSpec:
    """Parse ``envs/baseline-<tool>.yaml`` and return its pip list (see the module docstring)."""
    import yaml

    path = env_file(tool, envs_dir)
    if not path.exists():
        raise ConfigError(f"no environment file for baseline '{tool}'", path=str(path),
                          fix=f"create envs/baseline-{tool}.yaml (conda spec with a pip: list)")
    raw = path.read_bytes()
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc})", path=str(path)) from None
    deps = (doc or {}).get("dependencies") if isinstance(doc, dict) else None
    if not isinstance(deps, list):
        raise ConfigError("no 'dependencies' list", path=str(path), field="dependencies")
    pip = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    if len(pip) != 1 or not isinstance(pip[0], list) or not pip[0]:
        raise ConfigError("expected exactly one non-empty 'pip:' list under dependencies", path=str(path),
                          field="dependencies.pip")
    reqs = tuple(str(r).strip() for r in pip[0])
    for r in reqs:
        if _req_name(r) == "torch" and r.replace(" ", "") != TORCH_SPEC:
            raise ConfigError(f"torch must be pinned as '{TORCH_SPEC}' (the local CPU wheel), got '{r}'",
                              path=str(path), field="dependencies.pip")
    post = post_deploy_file(tool, envs_dir)
    post = post if post.exists() else None
    lock = lock_file(tool, envs_dir)
    lock = lock if lock.exists() else None
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    digest = hashlib.sha256(raw + (lock.read_bytes() if lock else b"") + (post.read_bytes() if post else b"")
                            + py.encode()).hexdigest()[:12]
    return EnvSpec(tool, path, reqs, digest, post, lock)


def env_python(env_dir: Path) -> Path:
    return Path(env_dir) / "bin" / "python"


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def _pip(python: Path, args: list[str], log_fh, timeout: int) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-input", *args]
    log_fh.write(f"$ {' '.join(cmd)}\n")
    log_fh.flush()
    try:
        r = subprocess.run(cmd, stdout=log_fh, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EpiflowError(f"pip install {' '.join(args)} took more than {timeout} s", field="pip") from None
    if r.returncode != 0:
        raise EpiflowError(f"pip install {' '.join(args)} failed (exit {r.returncode})", field="pip")


def _post_deploy(script: Path, env_dir: Path, log_fh, timeout: int) -> None:
    """Run the post-deploy script for the env at ``env_dir`` (see the module docstring)."""
    import shlex

    py = env_python(env_dir)
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX")}
    environ.update(PATH=f"{Path(env_dir) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                   VIRTUAL_ENV=str(env_dir), PYTHONNOUSERSITE="1",
                   EPIFLOW_PIP=f"{shlex.quote(sys.executable)} -m pip --python {shlex.quote(str(py))}")
    log_fh.write(f"$ bash {script}\n")
    log_fh.flush()
    with tempfile.TemporaryDirectory(prefix="epiflow-post-deploy-") as work:
        try:
            r = subprocess.run(["bash", str(script)], stdout=log_fh, stderr=subprocess.STDOUT, env=environ,
                               cwd=work, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EpiflowError(f"{script.name} took more than {timeout} s", path=str(script)) from None
    if r.returncode != 0:
        raise EpiflowError(f"{script.name} failed (exit {r.returncode})", path=str(script))


def ensure_env(tool: str, *, cache=None, envs_dir=None, timeout: int = DEFAULT_TIMEOUT) -> Path:
    """The env folder of ``tool``, built first when it is not in the cache (see the module docstring)."""
    spec = read_env_spec(tool, envs_dir)
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    final = spec.env_dir(cache)
    if (final / "epiflow-env.json").exists():
        return final
    with open(cache / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "epiflow-env.json").exists():  # built by another process meanwhile
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
        build_log = cache / f"{final.name}.build.log"
        t0 = time.perf_counter()
        log.info("building the %s environment in %s (pip log: %s)", tool, final, build_log)
        try:
            with open(build_log, "w") as fh:
                r = subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(tmp)], stdout=fh,
                                   stderr=subprocess.STDOUT)
                if r.returncode != 0:
                    raise EpiflowError(f"python -m venv failed (exit {r.returncode})", path=str(build_log))
                py = env_python(tmp)
                if spec.lock is not None:
                    _pip(py, ["--require-hashes", "--no-deps", "-r", str(spec.lock)], fh, timeout)
                else:
                    _pip(py, [q for q in spec.pip if _req_name(q) != "torch"], fh, timeout)
                if spec.needs_torch:
                    _pip(py, [TORCH_SPEC], fh, timeout)
                if spec.post_deploy is not None:
                    _post_deploy(spec.post_deploy, tmp, fh, timeout)
                freeze = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "freeze"],
                                        capture_output=True, text=True).stdout.split()
            meta = {"tool": tool, "env_file": str(spec.path), "digest": spec.digest, "pip": list(spec.pip),
                    "lock": str(spec.lock) if spec.lock else None,
                    "post_deploy": str(spec.post_deploy) if spec.post_deploy else None,
                    "python": f"{sys.version_info.major}.{sys.version_info.minor}", "freeze": freeze,
                    "build_seconds": round(time.perf_counter() - t0, 1)}
            (tmp / "epiflow-env.json").write_text(json.dumps(meta, indent=1))
            if final.exists():  # a half-built leftover (no marker): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except EpiflowError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = build_log.read_text()[-2000:] if build_log.exists() else ""
            raise EpiflowError(f"could not build the {tool} environment: {exc}\n--- pip log tail ---\n{tail}",
                               path=str(spec.path), fix=f"see {build_log}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("%s environment ready in %.0f s", tool, time.perf_counter() - t0)
    return final


def env_info(env_dir: Path) -> dict:
    return json.loads((Path(env_dir) / "epiflow-env.json").read_text())


def _package_path_dir(tmpdir: Path) -> Path:
    """A folder with only a link to the ``epiflow`` package, for the env's ``PYTHONPATH``."""
    d = tmpdir / "pkg"
    d.mkdir()
    (d / "epiflow").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    return d


def _absolute_paths(params: dict) -> dict:
    """Parameter values naming an existing file or folder relative to the caller's working directory
    become absolute: the tool runs in a temporary working directory."""
    out = {}
    for k, v in params.items():
        if isinstance(v, str) and v and not os.path.isabs(v) and os.path.exists(v):
            v = os.path.abspath(v)
        out[k] = v
    return out


def run_in_venv(tool: str, adata, task: str, params: dict, *, cache=None, envs_dir=None,
                timeout: int | None = None, build_timeout: int = DEFAULT_TIMEOUT, threads: int | None = None):
    """Run ``tool``'s adapter on ``adata`` in the tool's own environment; returns its BaselineOutput."""
    from .base import load_output

    env = ensure_env(tool, cache=cache, envs_dir=envs_dir, timeout=build_timeout)
    with tempfile.TemporaryDirectory(prefix=f"epiflow-{tool}-") as td:
        td = Path(td)
        inp, par, out = td / "input.h5ad", td / "params.json", td / "output.npz"
        adata.write_h5ad(inp)
        par.write_text(json.dumps(_absolute_paths(params)))
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
        # PYTHONHASHSEED pinned: a tool's result must not depend on the order of a set of strings, which
        # changes with the hash seed of each process (SnapATAC2's mnc_correct orders the batches by
        # list(set(labels)), and the first batch is the reference of the correction)
        environ.update(PYTHONPATH=str(_package_path_dir(td)), PYTHONNOUSERSITE="1", MPLBACKEND="Agg",
                       PYTHONHASHSEED=TOOL_HASH_SEED)
        if threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                environ[k] = str(threads)
        cmd = [str(env_python(env)), "-m", "epiflow.baselines.runner", "--tool", tool, "--task", task,
               "--input", str(inp), "--params", str(par), "--output", str(out)]
        log.info("running %s (%s) in %s", tool, task, env)
        try:
            r = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout, cwd=td)
        except subprocess.TimeoutExpired:
            raise EpiflowError(f"{tool} ran longer than {timeout} s", field="timeout") from None
        if r.stderr:
            for line in r.stderr.splitlines()[-40:]:
                log.debug("[%s] %s", tool, line)
        if r.returncode != 0:
            msgs = [ln[len("EPIFLOW-ERROR: "):] for ln in r.stderr.splitlines() if ln.startswith("EPIFLOW-ERROR: ")]
            if msgs:
                raise EpiflowError(f"{tool}: {msgs[-1]}")
            raise EpiflowError(f"{tool} failed in its environment (exit {r.returncode}):\n{r.stderr[-3000:]}",
                               path=str(env))
        res = load_output(out)
    res.info.setdefault("env", str(env))
    return res


def pip_index_reachable(package: str = "harmonypy", timeout: int = 60) -> bool:
    """True when pip can list versions of ``package`` from the configured index."""
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True,
                           timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return r.returncode == 0
