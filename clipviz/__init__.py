"""clipviz's tools around the Hub model code: the checkpoint converter, drawing explanation maps, and the
procedural scenes that train and test the embedded models. The model itself is the remote code at the repository
root (``configuration_clipviz``, ``modeling_clipviz``, ``explaining_clipviz``, ``tokenization_clipviz``), which this
package builds on and never the other way round.

The converter, from the bottom up (``clipviz-convert`` is its command line, ``convert_weights.py``):

* ``checkpoint_io``: reading checkpoint files without running code stored in them; downloading OpenAI's files.
* ``openai_clip``: OpenAI's image normalization, and its reference ``clip/model.py`` loaded by file path.
* ``convert_options``: what a conversion can be asked (imports nothing heavy, so the command line answers at once).
* ``sources``: the checkpoint to convert and what its files say besides the tensors.
* ``state_dict``: the key tables of OpenAI's, transformers' and open_clip's layouts; the architecture of a state dict.
* ``tokenizer_files``: the Hugging Face tokenizer files of OpenAI's BPE.
* ``hub_repo``: writing the converted folder, streamed, and only ever complete.
* ``verify``: reloading the folder and checking it against OpenAI's code and transformers' ``CLIPModel``.
* ``model_card``: the folder's README.md.
* ``push``: uploading the folder to the Hub in one commit.
* ``memory``: handing freed memory back to the OS, so a conversion holds one copy of the model.
* ``convert``: the pipeline that runs all of the above.

Explanations: ``rendering`` draws a map from ``model.explain`` over the image (Pillow, which the remote code must
not need). The embedded models: ``scenes`` (seeded procedural scenes with object masks) and ``train_embedded``
(their training).

Whole datasets (the ``dataset`` extra): ``dataset_explain`` (``clipviz-explain``: maps for every row of a Hugging Face
dataset into resumable Parquet shards, one process or many under ``accelerate``), ``dataset_eval`` (``clipviz-eval``:
scoring them per method) and ``metrics`` (one implementation of each localization and faithfulness metric, also used
by ``benchmarks/eval_localization.py``).

Kept import-free on purpose so that ``import clipviz`` is cheap; import the submodules you need.
"""

__version__ = "0.1.0"
