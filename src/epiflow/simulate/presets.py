"""Sizes and parameters of the synthetic corpus (:class:`SimPreset`), with the ``demo`` and ``test``
presets. Every number of the generative model lives here, so that ``README.md`` of a simulated
folder and ``truth/params.json`` can list them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class SimPreset:
    """All sizes and rates of one simulated corpus (see ``docs/simulate.md``)."""

    name: str
    #: number of true cCREs (the regulatory elements that carry signal)
    n_ccres: int
    #: number of synthetic genes (``GENE0001`` ...), grouped into GO modules of ``module_size``
    n_genes: int
    #: cell-type hierarchy: one path per cell type, ``lineage[/sublineage]/type``
    cell_types: tuple[str, ...]
    #: cells per batch of the atlas (one h5ad per batch)
    atlas_batch_cells: tuple[int, ...]
    #: cells of the 10x-style fragment dataset (plus empty-droplet barcodes)
    n_fragment_cells: int
    #: cell types of the stimulation dataset (control vs stimulated for each)
    stim_cell_types: tuple[str, ...]
    n_stim_cells: int
    #: cell type of the CRISPR-like knockout screen and the number of knocked-out genes
    perturb_cell_type: str
    n_knockouts: int
    n_perturb_cells: int
    #: cell type from which the cancer state arises; cells of the normal-vs-cancer pair
    cancer_cell_type: str
    n_cancer_cells: int

    module_size: int = 8
    #: expected fraction of cCREs detected per cell at the lowest / highest depth
    frac_lo: float = 0.032
    frac_hi: float = 0.082
    #: depth factor: log-normal (sigma) truncated to a range of ``depth_range`` (max / min)
    depth_range: float = 24.0
    depth_sigma: float = 0.75
    #: extra fragments per accessible cCRE: count = 1 + Poisson(count_extra_rate * depth)
    count_extra_rate: float = 0.03
    #: fragments outside any cCRE per cell: Poisson(background_rate * n_ccres * depth)
    background_rate: float = 0.02
    #: fraction of control cells in the knockout screen
    control_fraction: float = 0.2
    #: source cCRE set (``ccre_sources.bed``): recall of the true cCREs, extra inactive elements
    source_recall: float = 0.9
    source_decoy_frac: float = 0.25
    #: per dataset: extra (dataset-specific, noise) peaks and split peaks, as fractions of called peaks
    extra_peak_frac: float = 0.02
    split_peak_frac: float = 0.03
    #: empty-droplet barcodes in the fragment file, as a fraction of its cells
    empty_barcode_frac: float = 0.2
    #: recommended corpus thresholds for this preset (QC: accessible cCREs per cell; curation: cells per cCRE)
    min_ccres_per_cell: int = 100
    min_cells: int = 20

    # ------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        """Total number of cells over all datasets (empty droplets not counted)."""
        return (sum(self.atlas_batch_cells) + self.n_fragment_cells + self.n_stim_cells
                + self.n_perturb_cells + self.n_cancer_cells)

    @property
    def type_names(self) -> tuple[str, ...]:
        return tuple(p.rsplit("/", 1)[-1] for p in self.cell_types)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["n_cells"] = self.n_cells
        return d

    def replace(self, **overrides) -> "SimPreset":
        """A copy with some fields changed; ``n_cells`` rescales every dataset's cell count."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        n_cells = overrides.pop("n_cells", None)
        fields = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ConfigError(f"unknown simulation parameter(s) {', '.join(bad)}", field=bad[0],
                              fix=f"use fields of SimPreset: {', '.join(sorted(fields | {'n_cells'}))}")
        out = dataclasses.replace(self, **overrides)
        if n_cells is not None:
            n_cells = int(n_cells)
            if n_cells < 40:
                raise ConfigError(f"n_cells={n_cells} is too small", field="n_cells",
                                  fix="use at least 40 cells (every dataset needs a few cells per group)")
            f = n_cells / out.n_cells

            def sc(n, lo):
                return max(lo, int(round(n * f)))

            out = dataclasses.replace(
                out,
                atlas_batch_cells=tuple(sc(n, 2 * len(out.cell_types)) for n in out.atlas_batch_cells),
                n_fragment_cells=sc(out.n_fragment_cells, len(out.cell_types)),
                n_stim_cells=sc(out.n_stim_cells, 4 * len(out.stim_cell_types)),
                n_perturb_cells=sc(out.n_perturb_cells, 2 * (out.n_knockouts + 1)),
                n_cancer_cells=sc(out.n_cancer_cells, 4),
            )
        out.validate()
        return out

    def validate(self) -> None:
        types = self.type_names
        if len(set(types)) != len(types):
            raise ConfigError("cell type names (last path component) must be unique", field="cell_types")
        for fld in ("perturb_cell_type", "cancer_cell_type"):
            if getattr(self, fld) not in types:
                raise ConfigError(f"{fld}={getattr(self, fld)!r} is not one of the cell types {types}",
                                  field=fld, fix="name a cell type of cell_types")
        for t in self.stim_cell_types:
            if t not in types:
                raise ConfigError(f"stimulation cell type {t!r} is not one of {types}", field="stim_cell_types")
        if self.n_ccres < 300:
            raise ConfigError(f"n_ccres={self.n_ccres} is too small", field="n_ccres", fix="use >= 300")
        if self.n_genes < 4 * self.module_size:
            raise ConfigError(f"n_genes={self.n_genes} is too small", field="n_genes",
                              fix=f"use >= {4 * self.module_size} (4 GO modules)")
        if self.n_ccres < 2 * self.n_genes:
            raise ConfigError(f"n_ccres={self.n_ccres} must be at least 2 x n_genes={self.n_genes}",
                              field="n_ccres", fix="raise n_ccres or lower n_genes")
        if not (0 < self.frac_lo < self.frac_hi < 0.5):
            raise ConfigError("need 0 < frac_lo < frac_hi < 0.5", field="frac_lo")
        if self.depth_range < 1:
            raise ConfigError("depth_range must be >= 1", field="depth_range")
        if self.n_knockouts < 1 or self.n_knockouts > self.n_genes // 4:
            raise ConfigError(f"n_knockouts={self.n_knockouts} out of range", field="n_knockouts")


PRESETS: dict[str, SimPreset] = {
    # ~2,700 cells x 6,000 cCREs: the demo workflow (corpus, tiny pretraining on CPU, all tasks)
    "demo": SimPreset(
        name="demo",
        n_ccres=6000,
        n_genes=600,
        cell_types=("lymphoid/B", "lymphoid/T/CD4_T", "lymphoid/T/CD8_T", "lymphoid/NK",
                    "myeloid/CD14_Mono", "myeloid/cDC", "progenitor/HSPC"),
        atlas_batch_cells=(450, 450, 400),
        n_fragment_cells=200,
        stim_cell_types=("B", "CD4_T", "CD14_Mono"),
        n_stim_cells=420,
        perturb_cell_type="CD4_T",
        n_knockouts=16,
        n_perturb_cells=480,
        cancer_cell_type="B",
        n_cancer_cells=300,
        min_ccres_per_cell=100,
        min_cells=20,
    ),
    # ~440 cells x 1,500 cCREs: unit and end-to-end tests (seconds)
    "test": SimPreset(
        name="test",
        n_ccres=1500,
        n_genes=160,
        cell_types=("lymphoid/B", "lymphoid/T", "myeloid/Mono", "myeloid/DC"),
        atlas_batch_cells=(80, 80),
        n_fragment_cells=40,
        stim_cell_types=("B", "Mono"),
        n_stim_cells=80,
        perturb_cell_type="T",
        n_knockouts=6,
        n_perturb_cells=96,
        cancer_cell_type="B",
        n_cancer_cells=60,
        min_ccres_per_cell=20,
        min_cells=5,
    ),
}


def get_preset(name: str, **overrides) -> SimPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown simulation preset {name!r}", field="preset",
                          fix=f"use one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
