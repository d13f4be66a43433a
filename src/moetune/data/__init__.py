"""Training data: build the dataset (`moetune data`), split it, tokenize and pack it for training.

Each source kind (``data.sources[].type``) is one module of :mod:`moetune.data.sources`.

Entry points: :func:`moetune.data.build.build_dataset` (the `data` verb),
:func:`moetune.data.split.load_splits` (records), :func:`moetune.data.tokenizer.load_or_train_tokenizer`
and :func:`moetune.data.dataloaders.build_dataloaders` (torch-ready datasets and loaders for the trainer:
packing in :mod:`moetune.data.packing`, padding in :mod:`moetune.data.padding`).
"""
