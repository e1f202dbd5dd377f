"""The dataset manifest: which datasets make up a corpus and where their files are.

A manifest is a TSV (header line) or a YAML list (or ``{datasets: [...]}``) of entries with fields

====================  =============================================================================
``name``              unique dataset name (letters, digits, ``._-``)
``format``            ``fragments`` | ``snapatac2`` | ``10x_h5`` | ``10x_mtx`` | ``h5ad``
                      (``snapatac2``: the ``.h5ad`` of ``snapatac2.pp.import_fragments(..., file=)``,
                      whose stored fragments are mapped like a fragment file's; labels from its obs
                      unless ``labels`` is given)
``path`` / ``url``    file (relative to the manifest folder, or absolute) or a URL to download
``sha256``            optional checksum of the file; checked before use
``genome``            ``hg19`` | ``hg38``
``tissue``            free text (stored in the corpus obs)
``barcodes``          optional whitelist (fragments, snapatac2): one barcode per line
``labels``            optional TSV barcode -> label columns (fragments, snapatac2; header line)
``cell_type_key``     optional obs column (matrix inputs) or label column holding the cell type
``batch_key``         optional obs/label column holding the batch (default: the dataset name)
``peaks``             optional BED of the dataset's peaks (fragments, snapatac2), used for candidate
                      cCREs
``role``              ``corpus`` (default when absent or empty): in the vocabulary count, the corpus
                      document frequency and the pretraining cells; ``downstream``: mapped onto the
                      candidate cCREs and tokenized onto the corpus vocabulary with the corpus
                      document frequency, never seen by curation or pretraining (its peaks are not
                      candidate cCREs either)
``split``             optional ``heldout:FRACTION[:SEED]`` or ``rest:FRACTION[:SEED]``: keep only the
                      held-out part (a stratified FRACTION of the file's cells, per ``cell_type``,
                      drawn with SEED, default 0) or the rest. Two entries on the same file with the
                      same FRACTION and SEED and the two parts hold disjoint, complementary cells
                      (e.g. pretrain on ``rest``, evaluate the ``heldout`` quarter as ``downstream``)
====================  =============================================================================

Entries that read the same file (the same resolved path, URL or sha256) are checked when the manifest
is loaded: a whole file may not be both ``corpus`` and ``downstream`` (its downstream cells would be
pretrained on), nor twice in the corpus; parts of one file must be ``heldout``/``rest`` with the same
FRACTION and SEED.

Other columns are kept in :attr:`DatasetEntry.extra`. ``data_mirror`` is a folder searched for the
file name of a URL (and of a missing relative path) before anything is downloaded, for machines
without internet access.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import ConfigError
from ..io import atomic_path, sha256_file

log = logging.getLogger(__name__)

FORMATS = ("fragments", "snapatac2", "10x_h5", "10x_mtx", "h5ad")
FRAGMENT_FORMATS = ("fragments", "snapatac2")  # fragments mapped onto the cCREs (whitelist, labels, peaks)
GENOMES = ("hg19", "hg38")
FIELDS = ("name", "format", "path", "url", "sha256", "genome", "tissue", "barcodes", "labels",
          "cell_type_key", "batch_key", "peaks", "role", "split")
ROLES = ("corpus", "downstream")
SPLIT_PARTS = ("heldout", "rest")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class DatasetEntry:
    name: str
    format: str
    genome: str
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    tissue: str = ""
    barcodes: str | None = None
    labels: str | None = None
    cell_type_key: str | None = None
    batch_key: str | None = None
    peaks: str | None = None
    role: str = "corpus"
    split: str | None = None
    extra: dict = field(default_factory=dict)
    manifest: Path | None = None
    line: int | None = None  # line in a TSV manifest, entry number (1-based) in YAML

    def where(self) -> dict:
        """Keyword arguments locating this entry for error messages."""
        return {"path": str(self.manifest) if self.manifest else None, "line": self.line}

    @property
    def is_downstream(self) -> bool:
        return self.role == "downstream"

    def split_spec(self) -> tuple[str, float, int] | None:
        """``(part, fraction, seed)`` of the ``split`` field, or None (all cells of the file)."""
        return parse_split(self.split, **self.where()) if self.split else None

    def _resolve_aux(self, value: str | None, fld: str, data_mirror=None) -> Path | None:
        if not value:
            return None
        p = Path(value)
        if not p.is_absolute() and self.manifest is not None:
            p = self.manifest.parent / p
        if not p.exists() and data_mirror:
            m = Path(data_mirror) / Path(value).name
            if m.exists():
                return m
        if not p.exists():
            raise ConfigError(f"dataset '{self.name}': {fld} file {p} does not exist", field=fld,
                              fix=f"fix the '{fld}' column or put the file there", **self.where())
        return p

    def barcodes_path(self, data_mirror=None) -> Path | None:
        return self._resolve_aux(self.barcodes, "barcodes", data_mirror)

    def labels_path(self, data_mirror=None) -> Path | None:
        return self._resolve_aux(self.labels, "labels", data_mirror)

    def peaks_path(self, data_mirror=None) -> Path | None:
        return self._resolve_aux(self.peaks, "peaks", data_mirror)


def _clean(v):
    if v is None:
        return None
    if isinstance(v, float) and pd.isna(v):
        return None
    s = str(v).strip()
    return s if s and s.lower() not in ("na", "nan", "none", "-") else None


def parse_split(value: str, *, path=None, line=None) -> tuple[str, float, int]:
    """``heldout:0.25[:SEED]`` / ``rest:0.25[:SEED]`` -> ``(part, fraction, seed)``; a clear error else."""
    fix = ("write heldout:FRACTION[:SEED] or rest:FRACTION[:SEED], e.g. heldout:0.25:0 "
           "(FRACTION in (0, 1), SEED an integer)")
    parts = str(value).strip().split(":")
    if len(parts) not in (2, 3) or parts[0] not in SPLIT_PARTS:
        raise ConfigError(f"invalid split '{value}'", field="split", fix=fix, path=path, line=line)
    try:
        frac = float(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ConfigError(f"invalid split '{value}'", field="split", fix=fix, path=path, line=line) from None
    if not 0.0 < frac < 1.0:
        raise ConfigError(f"split fraction {frac} is not in (0, 1)", field="split", fix=fix, path=path,
                          line=line)
    return parts[0], frac, seed


def split_mask(labels, part: str, fraction: float, seed: int = 0):
    """Boolean mask of the cells in ``part`` of a stratified split of a file's cells.

    Per label (stratum), ``round(fraction * n_label)`` cells form the held-out part, drawn by one
    permutation from ``numpy.random.default_rng(seed)`` over all cells of the file (vectorised; the
    same file, fraction and seed always give the same cells). ``part='heldout'`` returns them,
    ``'rest'`` the complement.
    """
    import numpy as np

    labels = np.asarray(labels).astype(str)
    n = len(labels)
    _, codes = np.unique(labels, return_inverse=True)
    perm = np.random.default_rng(int(seed)).permutation(n)
    order = perm[np.argsort(codes[perm], kind="stable")]  # cells grouped by label, random within
    counts = np.bincount(codes, minlength=codes.max() + 1 if n else 0)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, dtype=np.int64)
    pos = np.arange(n) - start[codes[order]]
    take = np.rint(fraction * counts).astype(np.int64)
    held = np.zeros(n, dtype=bool)
    held[order[pos < take[codes[order]]]] = True
    return held if part == "heldout" else ~held


def _entry_from_record(rec: dict, manifest: Path, line: int) -> DatasetEntry:
    where = {"path": str(manifest), "line": line}
    rec = {str(k).strip(): _clean(v) for k, v in rec.items()}
    for req in ("name", "format", "genome"):
        if not rec.get(req):
            raise ConfigError(f"required field '{req}' is empty", field=req,
                              fix="fill it in (see docs: name, format, path|url, genome)", **where)
    name = rec["name"]
    if not _NAME_RE.match(name):
        raise ConfigError(f"dataset name '{name}' has characters other than letters, digits, '._-'",
                          field="name", fix="rename the dataset", **where)
    fmt = rec["format"]
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'", field="format", fix=f"use one of {', '.join(FORMATS)}",
                          **where)
    genome = rec["genome"]
    if genome not in GENOMES:
        raise ConfigError(f"unknown genome build '{genome}'", field="genome",
                          fix=f"use one of {', '.join(GENOMES)}", **where)
    if not rec.get("path") and not rec.get("url"):
        raise ConfigError(f"dataset '{name}' has neither 'path' nor 'url'", field="path",
                          fix="give the file path (relative to the manifest) or a URL", **where)
    sha = rec.get("sha256")
    if sha and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        raise ConfigError(f"'{sha}' is not a sha256 hex digest", field="sha256",
                          fix="64 hexadecimal characters (sha256sum FILE), or leave it empty", **where)
    if fmt not in FRAGMENT_FORMATS:
        for k in ("barcodes", "labels", "peaks"):
            if rec.get(k):
                log.warning("%s: field '%s' is only used for fragment inputs (dataset %s)", manifest, k, name)
    role = rec.get("role") or "corpus"
    if role not in ROLES:
        raise ConfigError(f"dataset '{name}': unknown role '{role}'", field="role",
                          fix="use 'corpus' (pretraining corpus; the default when empty) or 'downstream' "
                              "(evaluated only, never seen in pretraining)", **where)
    if rec.get("split"):
        parse_split(rec["split"], **where)
    known = {k: rec.get(k) for k in FIELDS if k not in ("name", "format", "genome", "role")}
    extra = {k: v for k, v in rec.items() if k not in FIELDS}
    return DatasetEntry(name=name, format=fmt, genome=genome, tissue=known.pop("tissue") or "",
                        role=role, extra=extra, manifest=manifest, line=line, **known)


def _file_keys(e: DatasetEntry) -> list[tuple[str, str]]:
    """What identifies the file of an entry: its path (resolved against the manifest folder), its
    URL and its checksum. Two entries that share any of them read the same file."""
    keys = []
    if e.path:
        p = Path(e.path)
        if not p.is_absolute() and e.manifest is not None:
            p = e.manifest.parent / p
        keys.append(("path", str(p.resolve())))
    if e.url:
        keys.append(("url", e.url.strip()))
    if e.sha256:
        keys.append(("sha256", e.sha256.lower()))
    return keys


def same_file_groups(entries: list[DatasetEntry]) -> list[list[DatasetEntry]]:
    """The entries grouped by the file they read (shared path, URL or sha256), groups of two or more,
    in manifest order."""
    parent = list(range(len(entries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, str], int] = {}
    for i, e in enumerate(entries):
        for key in _file_keys(e):
            if key in owner:
                a, b = find(owner[key]), find(i)
                parent[max(a, b)] = min(a, b)
            else:
                owner[key] = i
    groups: dict[int, list[DatasetEntry]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(find(i), []).append(e)
    return [g for g in groups.values() if len(g) > 1]


def _check_shared_files(entries: list[DatasetEntry], path: Path) -> None:
    """Entries that read the same file must not share cells where that matters.

    - A whole file (no ``split``) beside another entry of the file in the other role: the downstream
      cells would be pretrained on (or the corpus cells evaluated as unseen).
    - A whole file twice in the corpus, or beside a part of itself there: cells counted twice.
    - Parts of one file: the same fraction and seed (else they may overlap), never the same part twice.
    Several downstream entries of one whole file are allowed (e.g. two label columns)."""
    for group in same_file_groups(entries):
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a.split and b.split:
                    continue
                whole = a if not a.split else b
                if a.role != b.role:
                    corpus, down = (a, b) if a.role == "corpus" else (b, a)
                    raise ConfigError(
                        f"datasets '{corpus.name}' (line {corpus.line}, corpus) and '{down.name}' "
                        f"(line {down.line}, downstream) read the same file and '{whole.name}' takes all "
                        f"of its cells: the downstream cells would be seen in pretraining",
                        path=str(path), line=b.line, field="split",
                        fix="split the file: 'rest:F:S' on the corpus entry and 'heldout:F:S' on the "
                            "downstream one (same F and S), or drop one of the two entries")
                if a.role == "corpus":
                    raise ConfigError(
                        f"datasets '{a.name}' (line {a.line}) and '{b.name}' read the same file and "
                        f"'{whole.name}' takes all of its cells: the corpus would hold the same cells twice",
                        path=str(path), line=b.line, field="path",
                        fix="list the file once in the corpus, or split it into 'heldout:F:S' and 'rest:F:S'")
        parts = [e for e in group if e.split]
        specs = [e.split_spec() for e in parts]
        for e, (part, frac, seed) in zip(parts[1:], specs[1:]):
            if (frac, seed) != specs[0][1:]:
                first = parts[0]
                raise ConfigError(
                    f"datasets '{first.name}' (line {first.line}) and '{e.name}' split the same file with "
                    f"different fraction/seed ({first.split} vs {e.split}): their cells could overlap",
                    path=str(path), line=e.line, field="split",
                    fix="give both entries the same FRACTION and SEED (heldout:F:S and rest:F:S)")
        seen: dict[str, DatasetEntry] = {}
        for e, (part, _, _) in zip(parts, specs):
            if part in seen:
                raise ConfigError(
                    f"datasets '{seen[part].name}' (line {seen[part].line}) and '{e.name}' take the same "
                    f"part '{part}' of the same file: they would hold the same cells",
                    path=str(path), line=e.line, field="split", fix="use 'heldout' for one and 'rest' for the other")
            seen[part] = e


def load_manifest(path: str | os.PathLike) -> list[DatasetEntry]:
    """Read and validate a manifest (TSV or YAML). Does not touch the data files (see
    :func:`resolve_dataset`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("manifest not found", path=str(path), fix="give the path of the manifest file")
    entries: list[DatasetEntry] = []
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            raise ConfigError(f"invalid YAML ({exc})", path=str(path),
                              line=None if line is None else line + 1) from None
        if isinstance(data, dict):
            data = data.get("datasets")
        if not isinstance(data, list):
            raise ConfigError("a YAML manifest must be a list of datasets (or {datasets: [...]})",
                              path=str(path), fix="see the manifest format in docs/ARCHITECTURE.md")
        for i, rec in enumerate(data, start=1):
            if not isinstance(rec, dict):
                raise ConfigError(f"entry {i} is not a mapping", path=str(path), line=i)
            entries.append(_entry_from_record(rec, path, i))
    else:
        try:
            df = pd.read_csv(path, sep="\t", dtype=str, comment=None, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise ConfigError(f"cannot parse the TSV manifest ({str(exc).strip()})", path=str(path),
                              fix="tab-separated with a header line") from None
        missing = [c for c in ("name", "format", "genome") if c not in df.columns]
        if missing:
            raise ConfigError(f"missing column(s) {missing} in the header", path=str(path), line=1,
                              field=missing[0], fix="add the column(s); see docs/ARCHITECTURE.md")
        for i, rec in enumerate(df.to_dict("records")):
            entries.append(_entry_from_record(rec, path, i + 2))
    if not entries:
        raise ConfigError("the manifest lists no datasets", path=str(path), fix="add at least one dataset")
    seen: dict[str, int] = {}
    for e in entries:
        if e.name in seen:
            raise ConfigError(f"dataset name '{e.name}' is used twice (also at line {seen[e.name]})",
                              path=str(path), line=e.line, field="name", fix="names must be unique")
        seen[e.name] = e.line
    _check_shared_files(entries, path)
    return entries


def get_dataset(entries: list[DatasetEntry], name: str) -> DatasetEntry:
    for e in entries:
        if e.name == name:
            return e
    where = entries[0].manifest if entries else None
    raise ConfigError(f"no dataset named '{name}' in the manifest", path=where, field="name",
                      fix=f"use one of: {', '.join(e.name for e in entries)}")


def _download(url: str, dest: Path, entry: DatasetEntry) -> Path:
    log.info("downloading %s -> %s", url, dest)
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as fh:
                shutil.copyfileobj(r, fh, length=1 << 20)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"dataset '{entry.name}': cannot download {url} ({exc})", field="url",
                          fix="check the URL, or (offline) put the file into the data_mirror folder",
                          **entry.where()) from None
    return dest


def resolve_dataset(entry: DatasetEntry, *, data_mirror: str | os.PathLike | None = None,
                    download_dir: str | os.PathLike | None = None, verify: bool = True,
                    local_only: bool = False) -> Path:
    """The local path of the dataset's file: its ``path``, else the ``data_mirror`` copy of the URL's
    (or path's) file name, else a download into ``download_dir`` (not with ``local_only``: then a file
    that is not local is a :class:`ConfigError`). Checks ``sha256`` when given."""
    p: Path | None = None
    tried = []
    if entry.path:
        p = Path(entry.path)
        if not p.is_absolute() and entry.manifest is not None:
            p = entry.manifest.parent / p
        tried.append(str(p))
        if not p.exists():
            p = None
    if p is None and data_mirror:
        fname = Path(urllib.parse.urlparse(entry.url).path).name if entry.url else Path(entry.path).name
        m = Path(data_mirror) / fname
        tried.append(str(m))
        if m.exists():
            p = m
    if p is None and entry.url and not local_only:
        ddir = Path(download_dir) if download_dir else (
            (entry.manifest.parent if entry.manifest else Path.cwd()) / "downloads")
        dest = ddir / Path(urllib.parse.urlparse(entry.url).path).name
        p = dest if dest.exists() else _download(entry.url, dest, entry)
    if p is None:
        raise ConfigError(f"dataset '{entry.name}': file not found (tried {', '.join(tried)})",
                          field="path", fix="fix the path (relative to the manifest) or set data_mirror "
                                            "to a folder holding the file", **entry.where())
    if verify and entry.sha256 and p.is_file():
        got = sha256_file(p)
        if got.lower() != entry.sha256.lower():
            raise ConfigError(f"dataset '{entry.name}': sha256 of {p} is {got}, the manifest says "
                              f"{entry.sha256}", field="sha256",
                              fix="the file is corrupt or a different version: re-download it, or update "
                                  "the checksum if the change is intended", **entry.where())
    return p
