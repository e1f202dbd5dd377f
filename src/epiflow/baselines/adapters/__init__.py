"""Adapters: one ``fit_<tool>(adata, task, params) -> BaselineOutput`` per tool (see ``..base``).

``light`` needs only the main environment (numpy / scipy / scikit-learn); the other modules import
their tool inside the function, so they are importable anywhere and run in the tool's environment.
"""
