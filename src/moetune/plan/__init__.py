"""``moetune plan``: whether a run fits its GPUs and how long it takes, before any weight is loaded.

The model is built on the meta device from its config.json (:mod:`moetune.plan.model`) and the real
training plan is applied to it, so the parameters counted (:mod:`moetune.plan.params`) are those a run
trains. Memory per GPU (:mod:`moetune.plan.memory`) adds the model states as the launch shards them
(:mod:`moetune.plan.launch`), the activations autograd saves, measured by running the model's own
forward on meta tensors (:mod:`moetune.plan.activations`), the LM loss and a stated allowance; compute
(:mod:`moetune.plan.compute`) counts model FLOPs per token. :func:`moetune.plan.report.make_plan`
puts them together; ``moetune train`` runs it before loading weights on a GPU machine.

A stage between models and train: it reads the config, the model's family and its training plan, and
the accelerate / DeepSpeed files of a launch; train imports it for its pre-check.
"""
