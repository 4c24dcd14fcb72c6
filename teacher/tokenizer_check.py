"""Check that student and teacher share a tokenizer, so teacher log-probs line up with student tokens.

On-policy distillation scores the *student's* token ids under the teacher; that is only
meaningful when both map text to the same ids. ``check_tokenizers_compatible`` compares

1. the ids of a probe text (normalisers and pre-tokenisers included),
2. the token -> id maps (every token both tokenizers know must have the same id),
3. the special tokens (bos / eos / pad / unk) where both define them,
4. that ids are < both models' vocabulary sizes (embedding rows; may exceed len(tokenizer),
   e.g. Qwen pads 151,665 tokens to 151,936 rows), and that the student cannot sample
   an id the teacher has no row for.

Works with ``transformers`` tokenizers and raw ``tokenizers.Tokenizer`` objects.
"""

from __future__ import annotations

DEFAULT_PROBE = (
    "The quick brown fox jumps over the lazy dog. 1234567890 +-*/=<>!? "
    "def f(x):\n    return x ** 2  # comment\n\tTabs, émigré, naïve, 日本語, emoji 🙂."
)
SPECIALS = ("bos", "eos", "pad", "unk")


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenizers disagree; the message shows the first difference and the fix."""


_FIX = ("Use a teacher and a student from the same tokenizer family (e.g. Qwen2.5-7B -> Qwen2.5-0.5B), "
        "or a cross-tokenizer method (e.g. ULD / GOLD) instead of token-level distillation.")


def _encode(tok, text: str) -> list[int]:
    try:  # transformers
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:  # tokenizers.Tokenizer.encode(text, add_special_tokens=...) returns an Encoding
        pass
    enc = tok.encode(text, add_special_tokens=False)
    return list(enc.ids if hasattr(enc, "ids") else enc)


def _id_to_token(tok, i: int) -> str | None:
    if hasattr(tok, "convert_ids_to_tokens"):
        return tok.convert_ids_to_tokens(int(i))
    return tok.id_to_token(int(i))


def _special_ids(tok) -> dict[str, int | None]:
    return {name: getattr(tok, f"{name}_token_id", None) for name in SPECIALS}


def _vocab(tok) -> dict[str, int] | None:
    try:
        return tok.get_vocab()
    except (AttributeError, NotImplementedError):
        return None


def _tok_len(tok) -> int:
    return len(tok) if hasattr(tok, "__len__") else tok.get_vocab_size(with_added_tokens=True)


def check_tokenizers_compatible(
    student_tokenizer,
    teacher_tokenizer,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    probe_text: str = DEFAULT_PROBE,
) -> dict:
    """Raise ``TokenizerMismatchError`` if token ids would not mean the same thing to both models.

    Args:
        student_tokenizer, teacher_tokenizer: ``transformers`` tokenizers or ``tokenizers.Tokenizer``.
        student_vocab_size, teacher_vocab_size: embedding rows (``config.vocab_size``); None skips the range checks.
        probe_text: text whose ids must match exactly.

    Returns:
        {"probe_tokens": n, "shared_vocab": n or None, "special_token_ids": {...}} on success.
    """
    s_ids, t_ids = _encode(student_tokenizer, probe_text), _encode(teacher_tokenizer, probe_text)
    if s_ids != t_ids:
        j = next((k for k, (a, b) in enumerate(zip(s_ids, t_ids)) if a != b), min(len(s_ids), len(t_ids)))
        s_tok = (s_ids[j], _id_to_token(student_tokenizer, s_ids[j])) if j < len(s_ids) else "<end>"
        t_tok = (t_ids[j], _id_to_token(teacher_tokenizer, t_ids[j])) if j < len(t_ids) else "<end>"
        raise TokenizerMismatchError(
            f"student and teacher tokenize the probe text differently ({len(s_ids)} vs {len(t_ids)} tokens); "
            f"first difference at token {j}: student (id, token) = {s_tok}, teacher = {t_tok}. {_FIX}"
        )

    s_vocab, t_vocab = _vocab(student_tokenizer), _vocab(teacher_tokenizer)
    shared = None
    if s_vocab is not None and t_vocab is not None:
        common = s_vocab.keys() & t_vocab.keys()
        diff = sorted((s_vocab[w], w) for w in common if s_vocab[w] != t_vocab[w])
        if diff:
            i, w = diff[0]
            raise TokenizerMismatchError(
                f"{len(diff)} tokens have different ids; first: {w!r} is id {i} for the student but "
                f"{t_vocab[w]} for the teacher. {_FIX}"
            )
        shared = len(common)

    s_special, t_special = _special_ids(student_tokenizer), _special_ids(teacher_tokenizer)
    for name in SPECIALS:
        a, b = s_special[name], t_special[name]
        if a is not None and b is not None and a != b:
            raise TokenizerMismatchError(
                f"{name} token differs: student id {a} ({_id_to_token(student_tokenizer, a)!r}) vs teacher id {b} "
                f"({_id_to_token(teacher_tokenizer, b)!r}). Set the student's {name}_token to the teacher's "
                f"(tokenizer and generation_config) so stop tokens and padding agree."
            )

    used = s_ids + [i for i in s_special.values() if i is not None]
    for who, size in (("student", student_vocab_size), ("teacher", teacher_vocab_size)):
        if size is not None and used and max(used) >= size:
            raise TokenizerMismatchError(f"token id {max(used)} is >= the {who} model's vocab_size {size}; the tokenizer does not belong to that model.")
    if student_vocab_size is not None and teacher_vocab_size is not None and student_vocab_size > teacher_vocab_size:
        s_len = _tok_len(student_tokenizer)
        if s_len > teacher_vocab_size:
            raise TokenizerMismatchError(
                f"the student tokenizer has {s_len} tokens but the teacher only {teacher_vocab_size} embedding rows; "
                f"the student can emit ids the teacher cannot score. {_FIX}"
            )
        # rows in [teacher_vocab_size, student_vocab_size) are padding the student never trained on;
        # the rollout must mask them (logits[..., teacher_vocab_size:] = -inf) so they are never sampled.
    return {"probe_tokens": len(s_ids), "shared_vocab": shared, "special_token_ids": s_special}
