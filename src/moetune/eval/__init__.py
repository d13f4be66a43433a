"""Evaluation: base vs fine-tuned perplexity, generations, QA scores and routing by group (`moetune eval`)."""
