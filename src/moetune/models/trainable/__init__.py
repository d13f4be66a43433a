"""What trains: the training plan (attention LoRA, routers, shared experts), LoRA on the experts and
their parameter counts, ESFT's selected experts, and the files that hold what trained."""
