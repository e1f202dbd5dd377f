"""The ``README.md`` written into every simulated folder: generative model, seed, sizes, files."""

from __future__ import annotations

import numpy as np

from .layout import GO_NEIGHBOUR_MIN_JACCARD, KO_DIRECT, KO_NEIGHBOUR


def _q(x, qs=(0, 0.05, 0.5, 0.95, 1)):
    v = np.quantile(np.asarray(x, dtype=float), qs)
    return " / ".join(f"{a:.3g}" for a in v)


def render_readme(p, seed, lay, eff, datasets, tables) -> str:
    cells = tables["cells"]
    frac = cells["n_accessible"] / lay.n_ccres
    nd = tables["ccres"]["n_cells_detected"]
    ds_rows = []
    for d in datasets:
        extra = [c for c in ("condition", "perturbation", "state") if c in d.obs]
        groups = ", ".join(f"{k}: {v}" for k, v in d.obs[extra[0]].value_counts().sort_index().items()) \
            if extra else ", ".join(f"{k} {v}" for k, v in d.obs["cell_type"].value_counts().sort_index().items())
        path = f"datasets/{d.name}.tsv.gz" if d.fmt == "fragments" else f"datasets/{d.name}.h5ad"
        ds_rows.append(f"| `{d.name}` | {d.fmt} | `{path}` | {len(d.obs)} | {len(d.peaks)} ({d.peak_style}) | "
                       f"{', '.join(['cell_type', 'lineage', 'batch'] + extra)} | {groups} |")
    types = "\n".join(f"- `{path}`" for path in p.cell_types)
    n_prog = tables["programs"].groupby("level")["ccre_id"].count()
    prog_rows = "\n".join(f"| {lvl} | {int(n)} |" for lvl, n in n_prog.items())
    return f"""# Synthetic scATAC-seq corpus (epiflow simulate)

Preset **{p.name}**, seed **{seed}**: {p.n_cells} cells in {len(datasets)} datasets,
{lay.n_ccres} true cCREs, {len(lay.genes)} genes, {len(p.cell_types)} cell types.
Regenerate byte-identically with

    epiflow simulate --out DIR --preset {p.name} --seed {seed}

All of it is synthetic. Coordinates use hg38 chromosome names and lengths (chr1-22, chrX; 0-based
half-open, BED), so the manifest declares `genome = hg38`; but the positions are random, so
**genome-build detection is meaningless on these files: skip it** (or give it `tss.bed` of this
folder, which is the only TSS annotation that fits). No liftover is needed.

## Files

| file | contents |
|---|---|
| `manifest.tsv` | the datasets (columns {', '.join(['name', 'format', 'path', 'sha256', 'genome', 'tissue', 'barcodes', 'labels', 'cell_type_key', 'batch_key', 'peaks', 'role'])}; paths relative to this folder) |
| `datasets/*.h5ad` | cells x peaks raw counts (CSR int32), `var` chrom/start/end, `var_names` `chrom:start-end`; `obs` labels (cell_type, lineage, batch, + condition / perturbation / state) plus `n_fragments`, `frip` |
| `datasets/pbmc_fragments.tsv.gz` | 10x-style fragments (chrom, start, end, barcode, duplicate count; sorted; BGZF), incl. empty-droplet barcodes; `_barcodes.tsv` (cell whitelist), `_labels.tsv` (barcode, cell_type, lineage, batch), `_peaks.bed` |
| `ccre_sources.bed` | a source cCRE set (BED4, like ENCODE): {int(tables['ccres']['in_sources'].sum())} of the true cCREs (narrower, jittered) + {len(lay.sources) - int(tables['ccres']['in_sources'].sum())} elements never accessible in these cells |
| `genes.bed`, `tss.bed` | gene bodies (BED6) and 1-bp TSS (BED6) of the synthetic genes `GENE0001`... |
| `go.tsv` | gene_symbol, go_id (synthetic GO BP terms `GO:99xxxxx`; genes of one module share terms) |
| `truth/ccres.tsv` | true cCREs: id, interval, kind (promoter/enhancer/distal), linked gene, in_sources, datasets calling it, cells detecting it, base logit, gc, programs |
| `truth/programs.tsv` | program memberships (program, level, node, ccre_id, logit_effect) |
| `truth/cell_types.tsv`, `truth/genes.tsv` | hierarchy; genes with GO module, family and program |
| `truth/cells.tsv` | every cell (dataset, cell_id, labels, depth_factor, capture, expected_fraction, n_accessible, n_fragments, frip, state_score, ...), in file order |
| `truth/counts.npz` | cells (rows of cells.tsv) x true cCREs (rows of ccres.tsv) counts, CSR arrays indptr/indices/data/shape |
| `truth/batches.tsv`, `truth/batch_shift.tsv` | per batch the gc coefficient and the batch-specific cCREs with their shift |
| `truth/stimulation.tsv` | per stimulated cell type: cCREs, component (shared / type_specific / closing), logit effect, expected log2 fold change |
| `truth/knockouts.tsv` | per knocked-out gene: closed cCREs, relation (direct / go_neighbour), via_gene, GO Jaccard, logit effect |
| `truth/cancer.tsv` | cancer-program cCREs (open / close), logit effect, expected log2 fold change |
| `truth/peaks.tsv` | every dataset peak: source cCRE and kind (whole / split_left / split_right / extra) |
| `truth/params.json` | all parameters |

## Datasets

| name | format | path | cells | peaks | obs columns | groups |
|---|---|---|---|---|---|---|
{chr(10).join(ds_rows)}

## Generative model

Cell-type hierarchy (lineage[/sublineage]/type):
{types}

Accessibility programs (sets of cCREs with a logit effect each; counts of memberships):

| level | cCREs |
|---|---|
{prog_rows}

Program cCREs are partly the promoter + enhancers of the genes of whole GO modules (so that genes
sharing GO terms share accessibility) and partly distal elements. Per cell i and cCRE j:

    eta_ij = base_j + housekeeping_j + l_i * sum(programs of the type's lineage, sublineage, type)
           + u_i * state_j + beta_batch * gc_j + batch_specific_j
           + [stimulated] * stim_type,j + e_i * KO_gene,j + c_i * cancer_j
    pi_ij  = sigmoid(eta_ij)
    depth d_i: log-normal (sigma {p.depth_sigma}) truncated to a {p.depth_range:g}x range
    capture s_i = min(1, f_i / mean_j pi_ij), f_i = {p.frac_lo} * d_i ** gamma reaching {p.frac_hi} at the deepest cells
    detected ~ Bernoulli(s_i * pi_ij); count = 1 + Poisson({p.count_extra_rate} * d_i)
    fragments outside cCREs: Poisson({p.background_rate} * n_cCREs * d_i)

Knockouts close the promoter and enhancers of the gene (logit {KO_DIRECT:g}) and of its GO
neighbours (Jaccard >= {GO_NEIGHBOUR_MIN_JACCARD}, logit {KO_NEIGHBOUR:g} x Jaccard), scaled by a per-cell efficiency U(0.7, 1).
The cancer state opens the `cancer_open` program and closes part of the {p.cancer_cell_type} programs,
intensity U(0.6, 1) per cancer cell. Peaks per dataset: cCREs detected in >= 2 of its cells (97 %),
reshaped by the dataset's peak style, {p.split_peak_frac:.0%} split in two, plus {p.extra_peak_frac:.0%}
dataset-specific noise peaks.

## Measured

- accessible fraction of true cCREs per cell (min / 5% / median / 95% / max): {_q(frac)}
- depth factor: {_q(cells['depth_factor'])}; fragments per cell: {_q(cells['n_fragments'])}
- fraction of fragments in cCREs (frip): {_q(cells['frip'])}
- counts > 1: {float((tables['cells']['n_ccre_fragments'] - tables['cells']['n_accessible']).sum() / tables['cells']['n_ccre_fragments'].sum()):.1%} of fragments in cCREs fall on an already detected cCRE
- true cCREs detected in >= {p.min_cells} cells: {int((nd >= p.min_cells).sum())}; in >= 100 cells: {int((nd >= 100).sum())}

## Recommended corpus settings

`--min-ccres-per-cell {p.min_ccres_per_cell} --min-cells-per-ccre {p.min_cells}` (the paper's 100 cells per cCRE
is meant for millions of cells; at {p.n_cells} cells it would drop most type-specific cCREs).

## Notes

- The 5th column of the fragment file is the number of PCR duplicates (mostly 1). `truth/counts.npz`
  counts distinct fragments, so `epiflow map-dataset --no-count-column` reproduces it exactly for
  `pbmc_fragments`; the default (weighting by the column, as the authors' code) gives ~12 % more.
- Every interval (true cCRE, inactive source element, noise peak) sits alone in its own 2-kb bin, so
  merged candidates never join two true cCREs; fragments outside cCREs lie in bins with no interval.
- `truth/cells.tsv` rows are in file order: dataset by dataset as in `manifest.tsv`, cells as in the
  h5ad / the barcode whitelist. Cells are keyed by (dataset, cell_id).
"""
