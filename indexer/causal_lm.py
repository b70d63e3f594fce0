"""The causal-LM runner: a Hugging Face causal LM's no-grad forward pass, split at the LM head."""

from __future__ import annotations

import torch

from forvalue.indexer.runner import BaseRunner, ModelIdentity
from forvalue.indexer.tokenize import tokenize_sample


class CausalLMRunner(BaseRunner):
    """Forward pass of a Hugging Face causal LM split at the LM head (a :class:`~forvalue.indexer.runner.Runner`).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM in eval mode on ``device``.
    tokenizer : transformers.PreTrainedTokenizerBase
    device : torch.device
    identity : ModelIdentity, optional
    """

    model_kind = "causal_lm"

    def __init__(self, model, tokenizer, device: torch.device, identity: ModelIdentity | None = None):
        super().__init__(model, tokenizer, device, identity)
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None

    def tokenize(self, sample, score_tokens: str, max_length: int, chat_template: bool):
        """Prompt and response tokenized apart so their boundary is exact.

        See :func:`forvalue.indexer.tokenize.tokenize_sample`.
        """
        return tokenize_sample(self.tokenizer, sample, score_tokens, max_length, chat_template)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision=None) -> torch.Tensor:
        """Last hidden states (input of the LM head), shape ``(B, T, hidden_size)``; ``vision`` must be None."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.decoder is not None:
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1
        )
        return out.hidden_states[-1]
