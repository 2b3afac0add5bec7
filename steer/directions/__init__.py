"""Directions: contrast data, direction methods, candidate search, evaluation and optimisation.

Layers, bottom to top::

    data.py      prompt sets and pairs from files or installed packages, seeded splits, hashes
    methods.py   registry of direction methods (mean difference, PCA of pairs, projected)
    search.py    candidate directions over layers x positions, refusal score, selection, sweep
    evaluate.py  refusal / moralizing rate by generation, optional judge, first/multi-token KL
    optimize.py  heretic-style per-layer ablation kernels searched with Optuna
    recipe.py    the typed recipe schema (recipes/*.toml), validated on load
    api.py       ``compute(handle, recipe, out_dir, ...)``: the pipeline the server and CLI call
"""
