"""Evaluation: base vs fine-tuned perplexity, generations, QA scores and routing by group.

The verbs: `moetune eval` (:mod:`.compare_models`), `moetune generate` (:mod:`.generate`) and
`moetune experts` (:mod:`.expert_selection`). What they share: loading the models (:mod:`.load`),
batched generation (:mod:`.generation`), scoring (:mod:`.scoring`, :mod:`.qa_metrics`) and reports.
"""
