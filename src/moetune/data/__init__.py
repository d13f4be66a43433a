"""Training data: build the dataset (`moetune data`), split it, tokenize and pack it for training.

Each source kind (``data.sources[].type``) is one module of :mod:`moetune.data.sources`.

Entry points: :func:`moetune.data.build.build_dataset` (the `data` verb; ``--show`` is
:mod:`moetune.data.show`), :func:`moetune.data.split.load_splits` (records as lists, for evaluation),
:func:`moetune.data.record_table.load_split_tables` (the same split as memory-mapped Arrow tables, for
training), :func:`moetune.data.tokenizer.load_run_tokenizer` and :func:`moetune.data.dataloaders.build_dataloaders`
(torch-ready datasets and loaders for the trainer: packing in :mod:`moetune.data.packing`, padding in
:mod:`moetune.data.padding`). How a record becomes text with trained spans is :mod:`moetune.data.rendering`
(conversations: :mod:`moetune.data.chat_render`, with the chat template of :mod:`moetune.data.chat_templates`),
and how that becomes token ids and labels :mod:`moetune.data.encode`.
"""
