"""Accessibility programs, their logit effects, and the per-cell sampling of counts.

Per cell i and true cCRE j (all vectorised over cells x cCREs)::

    eta_ij = base_j + hk_j                                (constitutive elements)
           + l_i * sum_{node in path(type_i)} P_node,j    (hierarchical lineage / sublineage / type programs)
           + u_i * S_j                                    (continuous cell state, u ~ Beta(1.5, 3))
           + beta_b * gc_j + B_b,j                        (technical batch shift of batch b)
           + [stimulated] * STIM_type,j                   (stimulation response of the cell type)
           + e_i * KO_g,j                                 (knockout of gene g, efficiency e ~ U(0.7, 1))
           + c_i * CANCER_j                               (cancer state, intensity c ~ U(0.6, 1))
    pi_ij  = sigmoid(eta_ij)                              (the cCRE is open in the cell)
    d_i    ~ LogNormal(0, sigma) truncated to a max/min range of ``depth_range``; d_rel = d / d_min
    f_i    = frac_lo * d_rel ** gamma, gamma = log(frac_hi / frac_lo) / log(depth_range)
    s_i    = min(1, f_i / mean_j pi_ij)                   (capture: saturating in depth)
    a_ij   ~ Bernoulli(s_i * pi_ij)                       (detected)
    x_ij   = a_ij * (1 + Poisson(count_extra_rate * d_rel_i))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .layout import (EFFECT, GC_COEF_MAX, GO_NEIGHBOUR_MIN_JACCARD, KO_DIRECT, KO_NEIGHBOUR,
                     PROGRAM_FRACTION, Layout, rng_for)
from .presets import SimPreset

GENE_LINKED_SHARE = 0.35   # share of a module-linked program taken from its modules' genes


def tree_nodes(cell_types) -> list[tuple[str, str]]:
    """(node path, level) of the cell-type hierarchy in order of first appearance."""
    out, seen = [], set()
    for path in cell_types:
        parts = path.split("/")
        for k in range(1, len(parts) + 1):
            node = "/".join(parts[:k])
            if node in seen:
                continue
            seen.add(node)
            level = "cell_type" if k == len(parts) else ("lineage" if k == 1 else "sublineage")
            out.append((node, level))
    return out


@dataclass
class Effects:
    base: np.ndarray          # (N,) base logit incl. housekeeping
    node: np.ndarray          # (n_types, N) sum of the hierarchical programs of each type
    state: np.ndarray         # (N,)
    stim: np.ndarray          # (n_types, N) zero rows for types without stimulation
    cancer: np.ndarray        # (N,)
    batch: np.ndarray         # (n_batches, N)
    batch_gc: np.ndarray      # (n_batches,) coefficient of the gc term
    ko: np.ndarray            # (n_ko + 1, N); row 0 = control
    programs: pd.DataFrame    # program level node ccre_idx effect
    ko_genes: list[str]
    ko_truth: pd.DataFrame    # gene ccre_idx relation via_gene jaccard logit_effect
    gene_program: np.ndarray  # program name of each gene's module ('' = inactive)


def build_effects(lay: Layout, p: SimPreset, batches: list[str], seed: int) -> Effects:
    rng = rng_for(seed, "programs")
    N = lay.n_ccres
    cc = lay.ccres
    genes = lay.genes
    module = genes["module"].to_numpy()
    n_mod = int(module.max()) + 1
    gene_idx = cc["gene_idx"].to_numpy()
    linked = gene_idx >= 0
    mod_of_ccre = np.where(linked, module[np.maximum(gene_idx, 0)], -1)
    per_mod = np.bincount(mod_of_ccre[linked], minlength=n_mod)
    mean_per_mod = max(1.0, per_mod.mean())

    assigned = np.zeros(N, dtype=bool)
    distal_pool = [j for j in rng.permutation(np.flatnonzero(cc["kind"].to_numpy() == "distal"))]
    dpos = 0
    mod_order = list(rng.permutation(n_mod))
    gene_program = np.full(len(genes), "", dtype=object)
    rows = []   # (program, level, node, idx array)

    def take_unassigned(k: int) -> np.ndarray:
        nonlocal dpos
        got = []
        while len(got) < k and dpos < len(distal_pool):
            j = distal_pool[dpos]
            dpos += 1
            if not assigned[j]:
                got.append(j)
        if len(got) < k:  # distal pool exhausted: any unassigned cCRE
            rest = np.flatnonzero(~assigned)
            rest = rest[~np.isin(rest, got)]
            got += list(rng.permutation(rest)[: k - len(got)])
        idx = np.asarray(got, dtype=np.int64)
        assigned[idx] = True
        return idx

    def module_program(name, level, node, frac):
        size = max(4, int(round(frac * N)))
        n_m = max(1, int(round(GENE_LINKED_SHARE * size / mean_per_mod)))
        mods = [mod_order.pop(0) for _ in range(min(n_m, len(mod_order)))]
        idx = np.flatnonzero(np.isin(mod_of_ccre, mods) & ~assigned)
        assigned[idx] = True
        gene_program[np.isin(module, mods)] = name
        rest = take_unassigned(max(0, size - len(idx)))
        rows.append((name, level, node, np.sort(np.concatenate([idx, rest]))))

    module_program("housekeeping", "housekeeping", "", PROGRAM_FRACTION["housekeeping"])
    nodes = tree_nodes(p.cell_types)
    for node, level in nodes:
        module_program(f"node:{node}", level, node, PROGRAM_FRACTION[level])
    module_program("state:cycling", "state", "", PROGRAM_FRACTION["state"])
    module_program("stim:shared", "stim_shared", "", PROGRAM_FRACTION["stim_shared"])
    module_program("cancer:open", "cancer_open", p.cancer_cell_type, PROGRAM_FRACTION["cancer_open"])
    for t in p.stim_cell_types:
        k = max(3, int(round(PROGRAM_FRACTION["stim_type"] * N)))
        rows.append((f"stim:{t}", "stim_type", t, np.sort(take_unassigned(k))))
    for b in batches:
        k = max(3, int(round(PROGRAM_FRACTION["batch"] * N)))
        rows.append((f"batch:{b}", "batch", b, np.sort(take_unassigned(k))))

    # closing programs: subsets of a type's own programs
    type_path = {path.rsplit("/", 1)[-1]: path for path in p.cell_types}

    def own_programs(t):
        path = type_path[t].split("/")
        nodes_t = {"/".join(path[:k]) for k in range(1, len(path) + 1)}
        return np.concatenate([r[3] for r in rows if r[0].startswith("node:") and r[2] in nodes_t])

    for t in p.stim_cell_types:
        pool = own_programs(t)
        k = min(len(pool), max(2, int(round(PROGRAM_FRACTION["stim_close"] * N))))
        rows.append((f"stim_close:{t}", "stim_close", t, np.sort(rng.choice(pool, k, replace=False))))
    pool = own_programs(p.cancer_cell_type)
    k = min(len(pool), max(2, int(round(PROGRAM_FRACTION["cancer_close"] * N))))
    rows.append(("cancer:close", "cancer_close", p.cancer_cell_type, np.sort(rng.choice(pool, k, replace=False))))

    prog = []
    for name, level, node, idx in rows:
        mu, sd = EFFECT[level]
        eff = rng.normal(mu, sd, len(idx))
        if mu > 0:
            eff = np.maximum(eff, 0.5)
        else:
            eff = np.minimum(eff, -0.5)
        prog.append(pd.DataFrame({"program": name, "level": level, "node": node, "ccre_idx": idx,
                                  "effect": eff}))
    programs = pd.concat(prog, ignore_index=True)

    def vec(name):
        sub = programs[programs["program"] == name]
        v = np.zeros(N, dtype=np.float64)
        np.add.at(v, sub["ccre_idx"].to_numpy(), sub["effect"].to_numpy())
        return v

    base = cc["base_logit"].to_numpy() + vec("housekeeping")
    types = p.type_names
    node_eff = np.zeros((len(types), N))
    for ti, path in enumerate(p.cell_types):
        parts = path.split("/")
        for k in range(1, len(parts) + 1):
            node_eff[ti] += vec("node:" + "/".join(parts[:k]))
    stim = np.zeros((len(types), N))
    for t in p.stim_cell_types:
        ti = types.index(t)
        stim[ti] = vec("stim:shared") + vec(f"stim:{t}") + vec(f"stim_close:{t}")
    cancer = vec("cancer:open") + vec("cancer:close")
    gc = cc["gc"].to_numpy()
    batch_gc = rng.uniform(-GC_COEF_MAX, GC_COEF_MAX, len(batches))
    batch = np.stack([batch_gc[i] * gc + vec(f"batch:{b}") for i, b in enumerate(batches)])

    # ---- knockouts: genes of modules active in the perturbed cell type --------------------------
    pt_path = type_path[p.perturb_cell_type].split("/")
    active_progs = {"housekeeping"} | {"node:" + "/".join(pt_path[:k]) for k in range(1, len(pt_path) + 1)}
    act_mods = [m for m in range(n_mod) if gene_program[np.flatnonzero(module == m)[0]] in active_progs]
    act_mods = list(rng.permutation(act_mods))
    n_pick_mod = min(len(act_mods), max(1, int(np.ceil(p.n_knockouts / 2))))
    chosen: list[int] = []
    per = int(np.ceil(p.n_knockouts / n_pick_mod))
    for m in act_mods[:n_pick_mod]:
        members = np.flatnonzero(module == m)
        chosen += list(rng.choice(members, min(per, len(members)), replace=False))
    if len(chosen) < p.n_knockouts:  # small modules: fill from any active-module gene
        extra = np.flatnonzero(np.isin(module, act_mods) & ~np.isin(np.arange(len(genes)), chosen))
        chosen += list(rng.choice(extra, p.n_knockouts - len(chosen), replace=False))
    chosen = sorted(chosen[: p.n_knockouts])
    names = genes["gene"].to_numpy()
    ko = np.zeros((len(chosen) + 1, N))
    ko_rows = []
    for r, g in enumerate(chosen, start=1):
        direct = np.flatnonzero(gene_idx == g)
        ko[r, direct] += KO_DIRECT
        ko_rows.append(pd.DataFrame({"gene": names[g], "ccre_idx": direct, "relation": "direct",
                                     "via_gene": names[g], "jaccard": 1.0, "logit_effect": KO_DIRECT}))
        for h in np.flatnonzero(lay.jaccard[g] >= GO_NEIGHBOUR_MIN_JACCARD):
            idx = np.flatnonzero(gene_idx == h)
            e = KO_NEIGHBOUR * lay.jaccard[g, h]
            ko[r, idx] += e
            ko_rows.append(pd.DataFrame({"gene": names[g], "ccre_idx": idx, "relation": "go_neighbour",
                                         "via_gene": names[h], "jaccard": lay.jaccard[g, h],
                                         "logit_effect": e}))
    ko_truth = pd.concat(ko_rows, ignore_index=True)
    genes["program"] = gene_program
    return Effects(base=base, node=node_eff, state=vec("state:cycling"), stim=stim, cancer=cancer,
                   batch=batch, batch_gc=batch_gc, ko=ko, programs=programs,
                   ko_genes=[names[g] for g in chosen], ko_truth=ko_truth, gene_program=gene_program)


@dataclass
class CellDesign:
    """What each cell is (indices into the effects); one row per cell."""

    type_idx: np.ndarray
    batch_idx: np.ndarray
    stimulated: np.ndarray     # bool
    ko_idx: np.ndarray         # 0 = control / not perturbed
    cancer: np.ndarray         # bool


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def sample_cells(eff: Effects, p: SimPreset, design: CellDesign, rng: np.random.Generator):
    """Draw latent variables and counts for a set of cells (vectorised over cells x cCREs).

    Returns ``(counts CSR int32 cells x cCREs, per-cell DataFrame of latent variables)``.
    """
    n = len(design.type_idx)
    h = np.log(p.depth_range) / 2
    logd = np.clip(rng.normal(0.0, p.depth_sigma, n), -h, h)
    d_rel = np.exp(logd + h)                       # in [1, depth_range]
    loading = np.clip(rng.normal(1.0, 0.12, n), 0.6, 1.4)
    u = rng.beta(1.5, 3.0, n)
    ko_eff = np.where(design.ko_idx > 0, rng.uniform(0.7, 1.0, n), 0.0)
    c_int = np.where(design.cancer, rng.uniform(0.6, 1.0, n), 0.0)

    eta = (eff.base[None, :]
           + loading[:, None] * eff.node[design.type_idx]
           + u[:, None] * eff.state[None, :]
           + eff.batch[design.batch_idx])
    if design.stimulated.any():
        eta += design.stimulated[:, None] * eff.stim[design.type_idx]
    if (design.ko_idx > 0).any():
        eta += ko_eff[:, None] * eff.ko[design.ko_idx]
    if design.cancer.any():
        eta += c_int[:, None] * eff.cancer[None, :]
    pi = sigmoid(eta.astype(np.float32))
    del eta
    gamma = np.log(p.frac_hi / p.frac_lo) / np.log(p.depth_range)
    target = p.frac_lo * d_rel ** gamma
    pbar = pi.mean(axis=1)
    sens = np.minimum(1.0, target / pbar)
    detected = rng.random(pi.shape, dtype=np.float32) < (sens[:, None] * pi)
    del pi
    rows, cols = np.nonzero(detected)
    vals = 1 + rng.poisson(p.count_extra_rate * d_rel[rows])
    X = sp.csr_matrix((vals.astype(np.int32), (rows, cols)), shape=detected.shape)
    X.sort_indices()
    cells = pd.DataFrame({
        "depth_factor": d_rel, "type_loading": loading, "state_score": u, "ko_efficiency": ko_eff,
        "cancer_intensity": c_int, "mean_open_prob": pbar, "capture": sens, "expected_fraction": target,
        "n_accessible": np.diff(X.indptr), "n_ccre_fragments": np.asarray(X.sum(axis=1)).ravel(),
    })
    return X, cells


def expected_open(eff: Effects, type_idx: int, *, stimulated=False, ko_idx=0, cancer=0.0) -> np.ndarray:
    """Mean open probability of a cell type (no batch shift, loading 1, mean state)."""
    eta = eff.base + eff.node[type_idx] + (1.5 / 4.5) * eff.state
    if stimulated:
        eta = eta + eff.stim[type_idx]
    if ko_idx:
        eta = eta + 0.85 * eff.ko[ko_idx]
    if cancer:
        eta = eta + cancer * eff.cancer
    return sigmoid(eta)
