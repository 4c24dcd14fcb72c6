"""One forward pass that returns logits only at response positions (never the full (N, L, V))."""
from __future__ import annotations

import torch

from rollout.types import RolloutBatch


def response_logits(model, batch: RolloutBatch) -> torch.Tensor:
    """(N, T, V) logits aligned with `batch.response_tokens()`: [:, t] predicts response token t.

    Runs the decoder over the right-padded sequences, gathers the hidden states at positions
    prompt_len + t − 1 and applies the LM head there, so memory holds N·T·V logits, not N·L·V.
    Models without `get_decoder()` fall back to slicing the full logits.
    """
    device = next(model.parameters()).device
    seq = batch.sequences.to(device)
    attn = batch.attention_mask().to(device)
    pos = (batch.response_positions() - 1).clamp(min=0).to(device)  # (N, T)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=seq, attention_mask=attn).last_hidden_state  # (N, L, H)
        picked = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (N, T, H)
        return head(picked)
    logits = model(input_ids=seq, attention_mask=attn).logits  # (N, L, V)
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
