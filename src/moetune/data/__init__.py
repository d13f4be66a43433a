"""Training data: build the dataset (`moetune data`), split it, tokenize and pack it for training.

Each source kind (``data.sources[].type``) is one module of :mod:`moetune.data.sources`.

Entry points: :func:`moetune.data.build.build_dataset` (the `data` verb),
:func:`moetune.data.split.load_splits` (records), :func:`moetune.data.tokenizer.load_or_train_tokenizer`
and :func:`moetune.data.packing.build_train_eval_datasets` (torch-ready datasets for the trainer).
"""
