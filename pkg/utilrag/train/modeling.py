"""Bi-encoder over any Hugging Face encoder: CLS / mean / last-token pooling, shared or separate
towers, optional L2 normalisation; saved in HF format so anyone can load it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utilrag.encoder_spec import EncoderSpec, pool, write_spec

__all__ = ["BiEncoder", "pool"]


class BiEncoder(nn.Module):
    def __init__(
        self,
        model_path: str,
        pooling: str = "cls",
        normalize: bool = False,
        shared: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        from transformers import AutoModel

        self.query_encoder = AutoModel.from_pretrained(model_path)
        self.passage_encoder = self.query_encoder if shared else AutoModel.from_pretrained(model_path)
        if gradient_checkpointing:
            for enc in {
                id(self.query_encoder): self.query_encoder,
                id(self.passage_encoder): self.passage_encoder,
            }.values():
                enc.gradient_checkpointing_enable()
        self.pooling, self.normalize, self.shared = pooling, normalize, shared

    def encode(self, encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vectors = pool(hidden, attention_mask, self.pooling)
        return nn.functional.normalize(vectors, dim=-1) if self.normalize else vectors

    def forward(self, q_ids, q_mask, p_ids, p_mask):
        return (self.encode(self.query_encoder, q_ids, q_mask), self.encode(self.passage_encoder, p_ids, p_mask))

    def save(
        self,
        folder: Path,
        tokenizer,
        weights: dict[str, torch.Tensor] | None = None,
        spec: EncoderSpec | None = None,
    ) -> None:
        """HF format, fp32: the (query) encoder + tokenizer at folder; a separate passage tower under
        passage/. ``weights`` (BiEncoder parameter name -> tensor) replaces the module's own values,
        e.g. with DeepSpeed's fp32 master copies of a bf16 model."""
        folder = Path(folder)
        towers = [("query_encoder", self.query_encoder, folder)]
        if not self.shared:
            towers.append(("passage_encoder", self.passage_encoder, folder / "passage"))
        for prefix, encoder, where in towers:
            state = {
                k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in encoder.state_dict().items()
            }
            for name in list(state):
                if weights is not None and f"{prefix}.{name}" in weights:
                    state[name] = weights[f"{prefix}.{name}"].detach().float().cpu()
            encoder.save_pretrained(where, state_dict=state)
            tokenizer.save_pretrained(where)
        if spec is not None:  # how to encode with it: read back by the index and RAG stages
            write_spec(folder, spec.model_copy(update={"shared": self.shared}))
