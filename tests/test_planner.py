"""The sparsity-aware tree planner (runtime.planner): its acceptance and cost models and the plan it derives from
them, on constructed statistics where the best plan is known. Greedy equality with the planner on real models is in
test_speculative.py."""
from __future__ import annotations

import numpy as np
import pytest
from sparrow.runtime.planner import TreePlanner, nnls_small, node_keys, subtree
from sparrow.runtime.tree import Draft

# A wide tree: root -> 4 children, each of the first two with 2 children, then a chain below the first.
PARENTS = [0, 0, 0, 0, 1, 1, 2, 2, 5, 9]
TOKENS = list(range(100, 100 + len(PARENTS)))


def test_node_keys_are_sibling_ranks_along_the_path():
    keys = node_keys(PARENTS)
    assert keys[:4] == [(0,), (1,), (2,), (3,)]
    assert keys[4:8] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert keys[8:] == [(0, 0, 0), (0, 0, 0, 0)]


def test_subtree_renumbers_and_rejects_orphans():
    d = subtree(Draft(TOKENS, PARENTS), np.array([0, 1, 4, 8]))
    assert d.tokens == [100, 101, 104, 108] and d.parents == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="parent"):
        subtree(Draft(TOKENS, PARENTS), np.array([1, 4]))


def test_nnls_small_fits_and_keeps_coefficients_non_negative():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(50), rng.uniform(1, 25, 50)])
    y = X @ np.array([2.0, 0.5]) + rng.normal(0, 1e-3, 50)
    assert np.allclose(nnls_small(X, y), [2.0, 0.5], atol=1e-2)
    c = nnls_small(X, -X[:, 1])  # the unconstrained fit wants a negative slope
    assert np.all(c >= 0)


def train(planner: TreePlanner, *, accept_first_child: float, c0: float, c1: float, c2: float,
          bytes_per_t=lambda T: 0.0, steps: int = 400, seed: int = 0) -> None:
    """Feed the planner steps of a world where every node's first child is accepted with probability
    accept_first_child (others never) and a step of T tokens costs c0 + c1 T + c2 bytes(T)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        plan = planner.plan(Draft(TOKENS, PARENTS))
        path = [0]
        kids = {}
        for i, par in enumerate(plan.draft.parents, start=1):
            kids.setdefault(par, []).append(i)
        while kids.get(path[-1]) and rng.random() < accept_first_child:
            path.append(kids[path[-1]][0])
        T = len(plan.draft) + 1
        planner.observe(plan, path, T, bytes_per_t(T), c0 + c1 * T + c2 * bytes_per_t(T))


def best_prefix(planner: TreePlanner) -> int:
    """The plan's size by brute force over the planner's own models."""
    p = planner.node_p(PARENTS, node_keys(PARENTS))
    best, best_n = -1.0, 0
    for n in range(len(PARENTS) + 1):
        v = (1 + np.sort(p)[::-1][:n].sum()) / planner.step_time(np.array(n + 1.0))
        if v > best + 1e-12:
            best, best_n = v, n
    return best_n


def planned_size(planner: TreePlanner) -> int:
    sizes = []
    for _ in range(planner.explore_every):
        plan = planner.plan(Draft(TOKENS, PARENTS))
        if not plan.explored:
            sizes.append(len(plan.draft))
        planner.steps += 1
    return max(set(sizes), key=sizes.count)


def test_cost_fit_recovers_the_constructed_step_time():
    pl = TreePlanner()
    train(pl, accept_first_child=0.7, c0=4e-3, c1=0.5e-3, c2=0.0)
    assert pl.coef[0] == pytest.approx(4e-3, rel=1e-3) and pl.coef[1] == pytest.approx(0.5e-3, rel=1e-3)
    assert pl.q((0,)) == pytest.approx(0.7, abs=0.06) and pl.q((1,)) < 0.05


def test_plan_follows_acceptance_and_cost():
    """Cheap tokens and a well-predicted first child: keep the accepted chain (and little else); expensive tokens:
    keep less; a draft that is never accepted: keep nothing."""
    cheap, costly, hopeless = TreePlanner(), TreePlanner(), TreePlanner()
    train(cheap, accept_first_child=0.9, c0=5e-3, c1=0.1e-3, c2=0.0)
    train(costly, accept_first_child=0.9, c0=5e-3, c1=5e-3, c2=0.0)
    train(hopeless, accept_first_child=0.0, c0=5e-3, c1=0.1e-3, c2=0.0)
    n_cheap, n_costly, n_hopeless = planned_size(cheap), planned_size(costly), planned_size(hopeless)
    assert n_cheap == best_prefix(cheap) and n_costly == best_prefix(costly)
    assert n_cheap >= 4 > n_costly >= 1
    assert n_hopeless == 0


def test_expert_bytes_make_wide_trees_costlier():
    """Same acceptance and per-token cost; in one world every token brings new experts (the union grows linearly,
    no chunk sparsity), in the other the tokens of a tree share experts (the union saturates). The planner keeps
    fewer nodes where the union grows, and learns what a byte of experts costs."""
    shared, growing = TreePlanner(), TreePlanner()
    mb = 1e6
    train(shared, accept_first_child=0.8, c0=5e-3, c1=0.2e-3, c2=2e-3 / mb, bytes_per_t=lambda T: mb * min(T, 2))
    train(growing, accept_first_child=0.8, c0=5e-3, c1=0.2e-3, c2=2e-3 / mb, bytes_per_t=lambda T: mb * T)
    assert planned_size(growing) < planned_size(shared)
    step = growing.step_time(np.array([3.0, 9.0]))
    assert step == pytest.approx([5e-3 + 3 * 2.2e-3, 5e-3 + 9 * 2.2e-3], rel=0.05)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        TreePlanner(window=2)
