"""clipviz helpers: safe checkpoint reading (``clipviz.checkpoint_io``), CLIP tokenizer files
(``clipviz.tokenizer_files``), explaining and evaluating whole datasets (``clipviz.dataset_explain``,
``clipviz.dataset_eval``, ``clipviz.metrics``).

Kept import-free on purpose so that ``import clipviz`` is cheap; import the submodules you need.
"""

__version__ = "0.1.0"
