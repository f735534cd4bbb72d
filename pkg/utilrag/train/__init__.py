"""Train stage: a bi-encoder fitted with Ray Train + DeepSpeed on LLM or human labels (SumMargLH,
curriculum), saved in Hugging Face format."""

from utilrag.train.recipe import run_train

__all__ = ["run_train"]
