"""Score response tokens under a Hugging Face causal LM (the teacher).

``score_sequences`` is the one function every in-process backend (Ray pool, HTTP
service, colocated teacher) calls. It

1. validates the lengths (clear ``ValueError`` naming the rows and the fix),
2. sorts rows by length and packs them into micro-batches of at most ``token_budget``
   padded tokens (less padding waste), then restores the caller's order,
3. runs the decoder, gathers the hidden states at the M response-predicting
   positions only and applies the LM head there (an (M, V) matrix instead of
   (B, L, V)), in chunks so that the fp32 (chunk, V) block stays small,
4. takes an fp32 log-softmax and returns sampled-token / top-k / full log-probs.

The result equals ``torch.log_softmax(model(seq).logits.float(), -1)`` at those positions.
"""

from __future__ import annotations

import math

import torch

from teacher.types import MIN_TEMPERATURE, TeacherScores

# a student with more embedding rows than the teacher (padding) is fine; this many more is another tokenizer, and the
# (chunk, V) blocks below grow with it
MAX_EXTRA_VOCAB = 2**16

# fp32 elements of one (chunk, V) logits block: 2**26 * 4 B = 256 MiB
_LOGITS_CHUNK_ELEMS = 2**26


def validate_lengths(
    sequences: torch.Tensor,
    prompt_lens: torch.Tensor,
    response_lens: torch.Tensor,
    *,
    max_context: int | None = None,
    vocab_size: int | None = None,
) -> None:
    """Raise ``ValueError`` if the batch does not follow the shared layout.

    Shapes: sequences (N, L) integer, prompt_lens (N,), response_lens (N,).
    """
    if sequences.dim() != 2:
        raise ValueError(f"sequences must be (N, L), got shape {tuple(sequences.shape)}.")
    if sequences.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"sequences must hold int64 or int32 token ids, got dtype {sequences.dtype}.")
    N, L = sequences.shape
    for name, x in (("prompt_lens", prompt_lens), ("response_lens", response_lens)):
        if x.dim() != 1 or x.shape[0] != N:
            raise ValueError(f"{name} must be ({N},) to match sequences {tuple(sequences.shape)}, got {tuple(x.shape)}.")
        if x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 or int32 tensor, got dtype {x.dtype}.")
        bad = (x < 0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{name} must be >= 0, got negative values in rows {bad[:8]}.")
        bad = (x > L).nonzero().flatten().tolist()  # before the sum below, which could overflow
        if bad:
            raise ValueError(f"{name} beyond sequence length L = {L}: {x[bad[:8]].tolist()} in rows {bad[:8]}.")
    if N == 0:
        raise ValueError("empty batch: sequences has 0 rows.")
    bad = (prompt_lens < 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"prompt_lens must be >= 1 (the first response token is predicted from the last prompt token), "
            f"rows {bad[:8]} have 0; prepend a BOS token."
        )
    bad = (response_lens < 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"empty response in rows {bad[:8]}: response_lens must be >= 1; drop those rows before scoring.")
    total = prompt_lens + response_lens
    bad = (total > L).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"response span beyond sequence length in rows {bad[:8]}: prompt_lens + response_lens = "
            f"{total[bad[:8]].tolist()} > L = {L}."
        )
    if max_context is not None:
        bad = (total > max_context).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"sequence longer than the teacher's max context {max_context} in rows {bad[:8]} "
                f"(lengths {total[bad[:8]].tolist()}); truncate prompts or lower the generation max length."
            )
    if vocab_size is not None:
        cols = torch.arange(L, device=sequences.device)
        used = cols[None, :] < total[:, None].to(sequences.device)
        outside = ((sequences < 0) | (sequences >= vocab_size)) & used
        if bool(outside.any()):
            ids = sequences[used]
            bad = outside.any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"token ids outside [0, {vocab_size}) for this teacher in rows {bad[:8]} (range [{int(ids.min())}, "
                f"{int(ids.max())}]); student and teacher tokenizers probably differ (see teacher.tokenizer_check)."
            )


def plan_micro_batches(total_lens: torch.Tensor, token_budget: int) -> list[torch.Tensor]:
    """Group row indices so that rows * max_len <= token_budget per group (a longer row goes alone).

    Rows are taken longest first, so every group holds rows of similar length.
    Returns a list of (n_j,) int64 index tensors that partition range(N).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}.")
    order = torch.argsort(total_lens, descending=True, stable=True).tolist()
    lens = total_lens.tolist()
    groups, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lens[i])
        if cur and (len(cur) + 1) * new_max > token_budget:
            groups.append(torch.tensor(cur))
            cur, new_max = [], lens[i]
        cur.append(i)
        cur_max = new_max
    groups.append(torch.tensor(cur))
    return groups


def _response_hidden_or_logits(model, input_ids, attention_mask, rows, pos):
    """Return (M, H) hidden states + lm_head, or (M, V) logits when the head cannot be split off."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    # Models that post-process logits (Gemma-2 softcapping, Cohere logit_scale) go through
    # the full forward so the result stays exact.
    post = any(getattr(model.config, a, None) not in (None, 1.0) for a in ("final_logit_softcapping", "logit_scale"))
    if head is not None and decoder is not None and decoder is not model and not post:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        return hidden[rows, pos], head
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    return logits[rows, pos], None


@torch.inference_mode()
def score_sequences(
    model,
    sequences: torch.Tensor,
    prompt_lens: torch.Tensor,
    response_lens: torch.Tensor,
    *,
    topk: int = 0,
    return_full: bool = False,
    values_dtype: torch.dtype = torch.float32,
    token_budget: int = 16384,
    max_context: int | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> TeacherScores:
    """Teacher log-probs of each response token (and optionally top-k / full distributions).

    Args:
        model: HF causal LM, already on its device and in eval mode.
        sequences: (N, L) int64, right-padded prompt+response rows (any device).
        prompt_lens: (N,) int64, >= 1.
        response_lens: (N,) int64, >= 1.
        topk: K >= 0; K > 0 fills ``topk_ids`` (N, T, K) int32 and ``topk_logprobs`` (N, T, K).
        return_full: fill ``full_logprobs`` (N, T, V) float32 (small vocabularies only).
        values_dtype: dtype of ``topk_logprobs`` (float32, bfloat16 or float16).
        token_budget: max padded tokens (rows * max_len) per forward pass.
        max_context: longest allowed prompt+response; defaults to ``model.config.max_position_embeddings``.
        temperature: logits are divided by it before the log-softmax.
        vocab_size: the vocabulary the distribution is over (the student's embedding rows); None = the teacher's.
            Models of one family differ only in embedding padding past the tokenizer (Qwen2.5-7B has 152064 rows,
            0.5B 151936; no token id reaches them, checked at start-up): the teacher's extra rows are dropped
            before the softmax, and rows the teacher lacks get probability 0, so every id and column is one the
            student has.

    Returns:
        ``TeacherScores`` on ``sequences.device``, T = max(response_lens), zeros beyond each response.
    """
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}.")
    if not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(f"temperature must be finite and >= {MIN_TEMPERATURE}, got {temperature}.")
    if values_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"values_dtype must be float32, bfloat16 or float16, got {values_dtype}.")
    prompt_lens, response_lens = prompt_lens.long().cpu(), response_lens.long().cpu()
    if max_context is None:
        max_context = getattr(model.config, "max_position_embeddings", None)
    V_model = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    V = V_model if vocab_size is None else vocab_size
    if not 1 <= V <= V_model + MAX_EXTRA_VOCAB:
        raise ValueError(f"vocab_size must be in [1, {V_model + MAX_EXTRA_VOCAB}] (the teacher's {V_model} rows + "
                         f"{MAX_EXTRA_VOCAB}: a student vocabulary much larger is another tokenizer), got {vocab_size}.")
    validate_lengths(sequences, prompt_lens, response_lens, max_context=max_context, vocab_size=min(V, V_model))
    if topk > min(V, V_model):
        raise ValueError(f"topk={topk} exceeds the teacher vocabulary size {min(V, V_model)}.")

    out_device = sequences.device
    device = next(model.parameters()).device
    N = sequences.shape[0]
    T = int(response_lens.max())
    token_lp = torch.zeros(N, T, dtype=torch.float32, device=device)
    topk_ids = torch.zeros(N, T, topk, dtype=torch.int32, device=device) if topk else None
    topk_lp = torch.zeros(N, T, topk, dtype=values_dtype, device=device) if topk else None
    full_lp = torch.zeros(N, T, V, dtype=torch.float32, device=device) if return_full else None

    total_lens = prompt_lens + response_lens
    for group in plan_micro_batches(total_lens, token_budget):
        L_b = int(total_lens[group].max())
        input_ids = sequences[group.to(sequences.device), :L_b].to(device)  # (B, L_b)
        cols = torch.arange(L_b)
        attention_mask = (cols[None, :] < total_lens[group][:, None]).long().to(device)  # (B, L_b)

        # Flattened response positions of this micro-batch: M = sum(response_lens[group]).
        r = response_lens[group]
        local_row = torch.repeat_interleave(torch.arange(len(group)), r)  # (M,)
        t = torch.arange(int(r.sum())) - torch.repeat_interleave(torch.cumsum(r, 0) - r, r)  # (M,) 0..r_i-1
        pred_pos = prompt_lens[group][local_row] + t - 1  # (M,) logits position predicting y_t
        targets = input_ids[local_row.to(device), (pred_pos + 1).to(device)]  # (M,)
        out_row = group[local_row].to(device)
        t = t.to(device)

        feats, head = _response_hidden_or_logits(model, input_ids, attention_mask, local_row.to(device), pred_pos.to(device))
        M = feats.shape[0]
        chunk = max(1, _LOGITS_CHUNK_ELEMS // V)
        for s in range(0, M, chunk):
            sl = slice(s, s + chunk)
            logits = head(feats[sl]) if head is not None else feats[sl]  # (m, V_model)
            if V < V_model:
                logits = logits[:, :V]
            elif V > V_model:
                logits = torch.nn.functional.pad(logits, (0, V - V_model), value=float("-inf"))
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (m, V) fp32
            token_lp[out_row[sl], t[sl]] = logp.gather(1, targets[sl, None]).squeeze(1)
            if topk:
                vals, ids = torch.topk(logp, topk, dim=-1)  # (m, K)
                topk_ids[out_row[sl], t[sl]] = ids.to(torch.int32)
                topk_lp[out_row[sl], t[sl]] = vals.to(values_dtype)
            if return_full:
                full_lp[out_row[sl], t[sl]] = logp

    scores = TeacherScores(token_lp, topk_ids, topk_lp, full_lp)
    return scores if out_device == device else scores.to(out_device)
