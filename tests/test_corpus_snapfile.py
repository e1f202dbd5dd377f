"""Manifest format ``snapatac2``: the fragments stored in a SnapATAC2 .h5ad (import_fragments(file=...))
are mapped onto the cCREs exactly like the fragment file they came from (each fragment counted once)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from epiflow.corpus.manifest import load_manifest
from epiflow.corpus.mapping import CcreIndex, map_dataset, map_fragments
from epiflow.corpus.readers import FragmentReader
from epiflow.corpus.snapfile import SnapAtac2FragmentReader, read_layout
from epiflow.errors import InputFormatError

SIZES = {"chr1": 20_000, "chr2": 15_000, "chrX": 9_000}


def _fragments(seed=0, n=600, cells=("AAC-1", "CGT-1", "GTA-1", "TTT-1", "ACA-1")):
    """Distinct fragments (SnapATAC2 keeps each distinct fragment once) with a count column."""
    rng = np.random.default_rng(seed)
    chrom = rng.choice(list(SIZES), n)
    start = np.array([rng.integers(0, SIZES[c] - 900) for c in chrom])
    fr = pd.DataFrame({"chrom": chrom, "start": start, "end": start + rng.integers(20, 800, n),
                       "barcode": rng.choice(list(cells), n), "count": rng.integers(1, 4, n)})
    fr = fr.drop_duplicates(["chrom", "start", "end", "barcode"])
    order = np.lexsort((fr["start"], fr["chrom"].map(list(SIZES).index)))
    return fr.iloc[order].reset_index(drop=True)


def _ccres(seed=1, n=80):
    rng = np.random.default_rng(seed)
    rows = []
    for c, size in SIZES.items():
        s = np.sort(rng.choice(size // 250, n // 3, replace=False)) * 250
        rows.append(pd.DataFrame({"chrom": c, "start": s, "end": s + rng.integers(50, 240, len(s))}))
    return pd.concat(rows, ignore_index=True)


def write_snap_layout(path, fr: pd.DataFrame, obs: pd.DataFrame | None = None):
    """A file in SnapATAC2 2.x's layout (obsm/fragment_paired: cells x concatenated genome, value = length;
    uns/reference_sequences; Blosc-compressed like SnapATAC2 writes it), written with h5py/anndata."""
    import anndata as ad
    import h5py
    import hdf5plugin

    names = list(SIZES)
    offsets = dict(zip(names, np.concatenate([[0], np.cumsum(list(SIZES.values()))[:-1]])))
    cells = sorted(fr["barcode"].unique())
    rows = pd.Index(cells).get_indexer(fr["barcode"])
    pos = fr["chrom"].map(offsets).to_numpy() + fr["start"].to_numpy()
    # built by hand: two fragments of a cell with the same start stay two entries (scipy would sum them)
    order = np.lexsort((pos, rows))
    M = sp.csr_matrix(((fr["end"].to_numpy() - fr["start"].to_numpy())[order], pos[order],
                       np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(cells)))])),
                      shape=(len(cells), sum(SIZES.values())))
    obs = (obs.reindex(cells) if obs is not None else pd.DataFrame(index=cells)).copy()
    obs["n_fragment"] = np.diff(M.indptr).astype(np.uint64)
    obs.index = obs.index.astype(str)
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "obs", obs)
        g = f.create_group("obsm").create_group("fragment_paired")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": np.array(M.shape, dtype=np.int64)})
        blosc = hdf5plugin.Blosc()
        g.create_dataset("indptr", data=M.indptr.astype(np.int64))
        g.create_dataset("indices", data=M.indices.astype(np.int64), chunks=(min(1000, M.nnz),), **blosc)
        g.create_dataset("data", data=M.data.astype(np.uint32), chunks=(min(1000, M.nnz),), **blosc)
        ad.io.write_elem(f, "uns/reference_sequences", pd.DataFrame(
            {"reference_seq_name": names, "reference_seq_length": np.array(list(SIZES.values()), np.uint64)}))
    return path


def _by_barcode(counts, barcodes):
    b = np.asarray(barcodes).astype(str)
    keep = np.diff(sp.csr_matrix(counts).indptr) > 0
    order = np.argsort(b[keep])
    return sp.csr_matrix(counts)[np.flatnonzero(keep)[order]].toarray(), b[keep][order]


@pytest.mark.parametrize("chunksize", [1, 50, 10_000])
def test_reader_gives_the_fragments_and_the_counts_of_the_fragment_file(tmp_path, chunksize):
    fr = _fragments()
    snap = write_snap_layout(tmp_path / "s.h5ad", fr)
    rd = SnapAtac2FragmentReader(snap, chunksize=chunksize)
    got = pd.concat([pd.DataFrame({"chrom": c.chrom, "start": c.start, "end": c.end,
                                   "barcode": rd.barcodes[c.barcode]}) for c in rd], ignore_index=True)
    key = ["barcode", "chrom", "start", "end"]
    want = fr[key].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[key].sort_values(key).reset_index(drop=True).astype(want.dtypes), want)
    assert rd.stats["fragments"] == len(fr) and rd.stats["cells_read"] == fr["barcode"].nunique()
    # the counts: the fragment file mapped with each line counted once
    cc = CcreIndex.from_frame(_ccres())
    frag_file = tmp_path / "f.tsv"
    fr.to_csv(frag_file, sep="\t", header=False, index=False)
    a = map_fragments(FragmentReader(frag_file), cc, use_count_column=False)
    b = map_fragments(SnapAtac2FragmentReader(snap, chunksize=chunksize), cc)
    A, ba = _by_barcode(a.counts, a.barcodes)
    B, bb = _by_barcode(b.counts, b.barcodes)
    assert A.sum() > 20 and (ba == bb).all()
    np.testing.assert_array_equal(A, B)
    assert b.stats["fragments_in_ccres"] == a.stats["fragments_in_ccres"]


@pytest.mark.parametrize("chunksize", [7, 10_000])  # a cell per chunk; one chunk spanning skipped cells
def test_whitelist_reads_only_its_cells_in_its_order(tmp_path, chunksize):
    fr = _fragments()
    snap = write_snap_layout(tmp_path / "s.h5ad", fr)
    wl = ["TTT-1", "NOPE-1", "AAC-1", "CGT-1"]
    rd = SnapAtac2FragmentReader(snap, whitelist=wl, chunksize=chunksize)
    cc = _ccres()
    res = map_fragments(rd, CcreIndex.from_frame(cc))
    assert list(res.barcodes) == wl
    assert res.n_fragments.tolist() == [int((fr["barcode"] == b).sum()) for b in wl]
    full = map_fragments(SnapAtac2FragmentReader(snap), CcreIndex.from_frame(cc))
    rows = pd.Index(full.barcodes).get_indexer(["TTT-1", "AAC-1", "CGT-1"])
    np.testing.assert_array_equal(res.counts[[0, 2, 3]].toarray(), full.counts[rows].toarray())
    assert res.counts[1].nnz == 0
    assert rd.stats["skipped_not_whitelisted"] == int((~fr["barcode"].isin(wl)).sum())
    with pytest.raises(InputFormatError, match="none of the 2 whitelist barcodes") as e:
        map_fragments(SnapAtac2FragmentReader(snap, whitelist=["X-1", "Y-1"]), CcreIndex.from_frame(_ccres()))
    assert "AAC-1" in str(e.value)  # names the file's barcodes


def test_manifest_format_snapatac2_with_labels_from_obs(tmp_path):
    fr = _fragments()
    obs = pd.DataFrame({"cell_type": ["B", "T", "B", "NK", "T"]},
                       index=["AAC-1", "ACA-1", "CGT-1", "GTA-1", "TTT-1"])
    write_snap_layout(tmp_path / "s.h5ad", fr, obs)
    fr.to_csv(tmp_path / "f.tsv", sep="\t", header=False, index=False)
    m = tmp_path / "manifest.tsv"
    m.write_text("name\tformat\tpath\tgenome\tcell_type_key\n"
                 "snap\tsnapatac2\ts.h5ad\thg38\tcell_type\nfrag\tfragments\tf.tsv\thg38\t\n")
    snap_e, frag_e = load_manifest(m)
    cc = _ccres()
    a, rep = map_dataset(snap_e, cc, "hg38", tss=None, min_frac_in_ccres=0)
    b, _ = map_dataset(frag_e, cc, "hg38", tss=None, min_frac_in_ccres=0, use_count_column=False)
    assert rep["format"] == "snapatac2" and rep["fragments_used"] == len(fr) and not rep["use_count_column"]
    assert a.obs.set_index("barcode")["cell_type"].to_dict() == obs["cell_type"].to_dict()
    assert "n_fragment" in a.obs  # the file's own QC column is kept
    A, ba = _by_barcode(a.X, a.obs["barcode"])
    B, bb = _by_barcode(b.X, b.obs["barcode"])
    assert (ba == bb).all()
    np.testing.assert_array_equal(A, B)


def test_bad_files_are_clear_errors(tmp_path):
    import h5py

    txt = tmp_path / "frag.h5ad"
    txt.write_text("chr1\t1\t100\tA\t1\n")
    with pytest.raises(InputFormatError, match="not an HDF5 file"):
        read_layout(txt)
    peaks = tmp_path / "peaks.h5ad"
    import anndata as ad

    ad.AnnData(sp.csr_matrix(np.ones((2, 3), np.float32))).write_h5ad(peaks)
    with pytest.raises(InputFormatError, match="not a file written by snapatac2.pp.import_fragments") as e:
        read_layout(peaks)
    assert "format h5ad" in str(e.value)
    single = tmp_path / "single.h5ad"
    with h5py.File(single, "w") as f:
        f.create_group("obsm").create_group("fragment_single")
    with pytest.raises(InputFormatError, match="single-end"):
        read_layout(single)


def _snapatac2_python():
    from epiflow.baselines import venv

    env = venv.read_env_spec("snapatac2").env_dir(venv.default_cache())
    if not (env / "epiflow-env.json").exists():
        pytest.skip(f"snapatac2 is not installed: its environment is not in the cache ({env}); "
                    "run `epiflow baseline-env --tool snapatac2` (~1 GB, about 30 s once)")
    return str(venv.env_python(env))


@pytest.mark.slow
def test_a_file_written_by_snapatac2_maps_like_its_fragment_file(tmp_path):
    """snapatac2 2.9 itself writes the file (its own environment); the counts equal the fragment file's."""
    py = _snapatac2_python()
    fr = _fragments(seed=3, n=3000)
    frag = tmp_path / "f.tsv.gz"
    fr.to_csv(frag, sep="\t", header=False, index=False)
    code = ("import snapatac2 as snap, sys; snap.pp.import_fragments(sys.argv[1], "
            f"{SIZES!r}, file=sys.argv[2], min_num_fragments=0, sorted_by_barcode=False).close()")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAYON_NUM_THREADS"] = "1"
    subprocess.run([py, "-c", code, str(frag), str(tmp_path / "s.h5ad")], check=True, env=env,
                   capture_output=True, timeout=300)
    lay = read_layout(tmp_path / "s.h5ad")
    assert list(lay["chroms"]) == list(SIZES)
    cc = CcreIndex.from_frame(_ccres())
    a = map_fragments(FragmentReader(frag), cc, use_count_column=False)
    b = map_fragments(SnapAtac2FragmentReader(tmp_path / "s.h5ad", chunksize=500), cc)
    A, ba = _by_barcode(a.counts, a.barcodes)
    B, bb = _by_barcode(b.counts, b.barcodes)
    assert A.sum() > 100 and (ba == bb).all()
    np.testing.assert_array_equal(A, B)
    assert b.n_fragments.sum() == len(fr)
