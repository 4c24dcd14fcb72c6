"""Prompt and pretraining data: seeded resumable order, pretraining windows with BOS/EOS, early errors."""
import pytest
from transformers import AutoTokenizer

from launch.config import ConfigError, DataConfig, resolve_path
from trainer.data import PretrainData, PromptData, SeededOrder

TOKENIZER = resolve_path("builtin:tokenizer")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def test_seeded_order_visits_each_index_once_per_epoch_and_resumes():
    a = SeededOrder(7, seed=3)
    first = a.next_indices(7)
    assert sorted(first) == list(range(7))
    second = a.next_indices(7)
    assert sorted(second) == list(range(7)) and second != first  # a new shuffle per epoch
    b = SeededOrder(7, seed=3)
    b.next_indices(10)
    c = SeededOrder(7, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.next_indices(9) == b.next_indices(9)


def test_pretrain_windows_cover_each_document_with_bos_and_eos(tok):
    docs = ["the red fox follows the rabbit . " * 5, "alice has four apples .", "the"]
    data = PretrainData([{"text": d} for d in docs], tok, max_len=8, source="t")
    # independent: the tokenizer's own ids (BOS included as it adds it) plus EOS, cut every 8 tokens
    want = []
    for d in docs:
        ids = tok(d)["input_ids"] + [tok.eos_token_id]
        assert ids[0] == tok.bos_token_id
        want += [ids[j:j + 8] for j in range(0, len(ids), 8)]
    want = [w for w in want if len(w) >= 2]
    assert data.windows == want
    assert all(w[-1] == tok.eos_token_id for w in data.windows if len(w) < 8)
    assert max(map(len, data.windows)) == 8

    batch = data.next_batch(4, tok.pad_token_id)
    assert batch.prompt_lens.tolist() == [1] * 4
    for i in range(4):  # each row is one whole window: context token + LM targets
        P, R = int(batch.prompt_lens[i]), int(batch.response_lens[i])
        assert batch.sequences[i, :P + R].tolist() in want


def test_pretrain_bad_rows_fail_early(tok):
    with pytest.raises(ConfigError, match="row 1 has no string field 'text'"):
        PretrainData([{"text": "a"}, {"body": "b"}], tok, max_len=8, source="data.pretrain")
    with pytest.raises(ConfigError, match="pretrain_max_len must be >= 2"):
        PretrainData([{"text": "the red fox"}], tok, max_len=1, source="data.pretrain")


def test_prompt_too_long_is_an_error_not_a_truncation(tok):
    rows = [{"prompt": "the red fox"}, {"prompt": "the red fox follows the rabbit . " * 20}]
    with pytest.raises(ConfigError, match="row 1: prompt of .* tokens exceeds data.max_prompt_len=16"):
        PromptData(rows, tok, DataConfig(max_prompt_len=16), "data.prompts")
    data = PromptData(rows[:1], tok, DataConfig(), "data.prompts")
    assert data.prompts == [tok("the red fox")["input_ids"]] and data.responses == [None]
