"""clipviz helpers: safe checkpoint reading (``clipviz.checkpoint_io``) and CLIP tokenizer files (``clipviz.tokenizer_files``).

Kept import-free on purpose so that ``import clipviz`` is cheap; import the submodules you need.
"""
