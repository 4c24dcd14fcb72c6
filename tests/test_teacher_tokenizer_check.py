"""check_tokenizers_compatible on tiny word-level tokenizers built in the test."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from teacher.tokenizer_check import TokenizerMismatchError, check_tokenizers_compatible

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "."]
PROBE = "the quick brown fox jumps over the lazy dog ."


def word_tokenizer(words, specials=("<pad>", "<s>", "</s>", "<unk>"), bos="<s>") -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token=bos, eos_token="</s>", unk_token="<unk>")


def test_matched_pair_passes():
    a, b = word_tokenizer(WORDS), word_tokenizer(WORDS)
    info = check_tokenizers_compatible(a, b, student_vocab_size=16, teacher_vocab_size=32, probe_text=PROBE)
    assert info["probe_tokens"] == 10 and info["shared_vocab"] == 13
    assert info["special_token_ids"] == {"bos": 1, "eos": 2, "pad": 0, "unk": 3}


def test_raw_tokenizers_objects_work():
    a, b = word_tokenizer(WORDS), word_tokenizer(WORDS)
    check_tokenizers_compatible(a.backend_tokenizer, b.backend_tokenizer, probe_text=PROBE)


def test_permuted_vocab_names_first_differing_token():
    swapped = ["the", "quick", "fox", "brown", *WORDS[4:]]  # brown <-> fox
    with pytest.raises(TokenizerMismatchError, match=r"first difference at token 2: student \(id, token\) = \(6, 'brown'\), teacher = \(7, 'brown'\).*same tokenizer family"):
        check_tokenizers_compatible(word_tokenizer(WORDS), word_tokenizer(swapped), probe_text=PROBE)


def test_vocab_map_difference_outside_probe():
    more = [*WORDS, "cat"]
    other = [*WORDS, "cow", "cat"]
    with pytest.raises(TokenizerMismatchError, match="'cat' is id 13 for the student but 14"):
        check_tokenizers_compatible(word_tokenizer(more), word_tokenizer(other), probe_text=PROBE)


def test_special_token_mismatch():
    a = word_tokenizer(WORDS)
    b = word_tokenizer(WORDS, bos="</s>")  # same vocabulary, different BOS
    with pytest.raises(TokenizerMismatchError, match=r"bos token differs: student id 1 \('<s>'\) vs teacher id 2"):
        check_tokenizers_compatible(a, b, probe_text="")


def test_vocab_size_checks():
    a, b = word_tokenizer(WORDS), word_tokenizer(WORDS)
    with pytest.raises(TokenizerMismatchError, match="teacher model's vocab_size 8"):
        check_tokenizers_compatible(a, b, teacher_vocab_size=8, probe_text=PROBE)
    with pytest.raises(TokenizerMismatchError, match="teacher cannot score"):
        check_tokenizers_compatible(a, b, student_vocab_size=64, teacher_vocab_size=12, probe_text="the")
    # padded student rows beyond the teacher's are fine while the tokenizer fits the teacher
    check_tokenizers_compatible(a, b, student_vocab_size=64, teacher_vocab_size=16, probe_text=PROBE)
