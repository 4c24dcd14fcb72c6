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


# a chat template in the tiny vocabulary: "alice" opens a user turn, "bob" an assistant turn
CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}alice {% else %}bob {% endif %}"
        "{{ m['content'] }} . {% endfor %}{% if add_generation_prompt %}bob{% endif %}")


@pytest.fixture
def chat_tok():
    t = AutoTokenizer.from_pretrained(TOKENIZER)
    t.chat_template = CHAT
    return t


def _ids(tok, words: str) -> list[int]:
    """Word-level ids by vocabulary lookup (independent of the template engine and the tokenizer's call)."""
    return tok.convert_tokens_to_ids(words.split())


@pytest.mark.parametrize("row, cfg", [
    ({"prompt": "the red fox", "response": "the cat eats"}, {}),  # plain text through the template
    ({"messages": [{"role": "user", "content": "the red fox"}, {"role": "assistant", "content": "the cat eats"}]},
     {"prompt_key": "messages"}),  # TRL's `messages` column: the last assistant turn is the response
    ({"prompt": [{"role": "user", "content": "the red fox"}], "completion": [{"role": "assistant", "content": "the cat eats"}]},
     {"response_key": "completion"}),  # TRL's conversational prompt/completion
])
def test_chat_rows_give_the_templated_prompt_without_the_reply(chat_tok, row, cfg):
    data = PromptData([row], chat_tok, DataConfig(chat_template=True, **cfg), "data.prompts")
    assert data.prompts == [[chat_tok.bos_token_id] + _ids(chat_tok, "alice the red fox . bob")]
    assert data.responses == [_ids(chat_tok, "the cat eats") + [chat_tok.eos_token_id]]


def test_a_multi_turn_conversation_keeps_earlier_replies_in_the_prompt(chat_tok):
    msgs = [{"role": "user", "content": "the red fox"}, {"role": "assistant", "content": "the cat"},
            {"role": "user", "content": "the dog"}, {"role": "assistant", "content": "the bird eats"}]
    data = PromptData([{"messages": msgs}], chat_tok, DataConfig(chat_template=True, prompt_key="messages"), "e")
    assert data.prompts == [[chat_tok.bos_token_id] + _ids(chat_tok, "alice the red fox . bob the cat . alice the dog . bob")]
    assert data.responses == [_ids(chat_tok, "the bird eats") + [chat_tok.eos_token_id]]


def test_bad_chat_rows_fail_early_with_the_row(chat_tok, tok):
    reply = {"role": "assistant", "content": "the cat"}
    user = {"role": "user", "content": "the red fox"}
    cases = [
        ({"prompt": [user, reply], "response": "the dog"}, {}, "row 0: 'prompt' ends with an assistant reply and 'response' is set too"),
        ({"prompt": [reply]}, {}, "row 0: 'prompt' holds only an assistant reply"),
        ({"prompt": [user], "response": [reply, reply]}, {}, "'response' as messages must be one assistant message"),
        ({"prompt": [user], "response": [user]}, {}, "'response' as messages must be one assistant message"),
        ({"prompt": "the red fox", "response": 3}, {}, "row 0: the response must be text, got int"),
    ]
    for row, cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            PromptData([row], chat_tok, DataConfig(chat_template=True, **cfg), "data.prompts")
    with pytest.raises(ConfigError, match="prompt must be a string .*chat_template=true"):
        PromptData([{"prompt": [user]}], chat_tok, DataConfig(), "data.prompts")
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        PromptData([{"prompt": [user]}], tok, DataConfig(chat_template=True), "data.prompts")


ROWS = [{"prompt": "the red fox", "response": "the cat eats"}, {"prompt": "alice has", "response": None},
        {"prompt": "count one two", "response": "three"}]


def test_jsonl_parquet_and_datasets_sources_give_the_same_rows(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data import read_records

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")  # a blank last line is fine
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    folder = tmp_path / "hf_folder"  # a dataset folder as `datasets.load_dataset` reads it (no network)
    folder.mkdir()
    (folder / "test.jsonl").write_text((tmp_path / "p.jsonl").read_text())
    assert read_records(str(tmp_path / "p.jsonl")) == ROWS
    assert read_records(str(tmp_path / "p.parquet")) == ROWS
    assert read_records(f"hf:{folder}:test") == ROWS


def test_bad_data_sources_fail_early_naming_the_fix(tmp_path, tok):
    from trainer.data import read_records

    with pytest.raises(ConfigError, match="not found"):
        read_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "p.csv").write_text("prompt\nthe red fox\n")
    with pytest.raises(ConfigError, match=r"expected \.jsonl or \.parquet, or hf:NAME\[:SPLIT\]"):
        read_records(str(tmp_path / "p.csv"))
    with pytest.raises(ConfigError, match="could not be loaded .*hf:NAME"):
        read_records(f"hf:{tmp_path / 'no_such_dataset'}")
    with pytest.raises(ConfigError, match="data.prompts: no rows"):
        PromptData([], tok, DataConfig(), "data.prompts")
    with pytest.raises(ConfigError, match="row 1 has no field 'prompt' .*fields: text"):
        PromptData([{"prompt": "the"}, {"text": "the"}], tok, DataConfig(), "data.prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the"}\n\n{"prompt": "the red\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl' line 3 is not JSON: .* \(column 20\)"):
        read_records(str(bad))
    bad.write_text('{"prompt": "the"}\n["the", "red"]\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl' line 2 is a JSON list, not an object"):
        read_records(str(bad))
    with pytest.raises(ConfigError, match="data.prompts row 1: the prompt must be a string .*got int"):
        PromptData([{"prompt": "the"}, {"prompt": 7}], tok, DataConfig(), "data.prompts")


def test_off_policy_gkd_without_responses_fails_before_any_actor(tmp_path):
    import json

    from launch.config import load_config
    from trainer.loop import load_data
    from trainer.roles import load_tokenizers

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = load_config("gkd_cpu", [f"data.prompts={tmp_path / 'p.jsonl'}", "objective.lam=0.5"])
    with pytest.raises(ConfigError, match=r"objective.lam=0.5 < 1 uses the dataset's responses.*data.response_key"):
        load_data(cfg, load_tokenizers(cfg))
    # on-policy only (λ = 1) or sequence-level KD (teacher samples) needs no responses
    for extra in (["objective.lam=1.0"], ["objective.lam=0.5", "objective.seq_kd=true"]):
        cfg = load_config("gkd_cpu", [f"data.prompts={tmp_path / 'p.jsonl'}", *extra])
        assert len(load_data(cfg, load_tokenizers(cfg)).train.prompts) == 3


def test_the_student_generation_configs_eos_ids_end_responses(tmp_path):
    """Instruct models list several EOS ids in generation_config.json (end of turn, end of text): the rollout
    stops at all of them, as `generate` and vLLM do, and the exported student keeps the list."""
    import json
    import shutil

    from launch.config import load_config
    from trainer.loop import generation_config, sampling
    from trainer.roles import load_tokenizers

    listed, bare = tmp_path / "listed", tmp_path / "bare"
    shutil.copytree(resolve_path("builtin:tiny-student"), listed)
    shutil.copytree(resolve_path("builtin:tiny-student"), bare)
    gen = json.loads((listed / "generation_config.json").read_text())
    (listed / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 9]}))
    (bare / "generation_config.json").unlink()

    cfg = load_config(None, [f"model.student={listed}"])
    tok = load_tokenizers(cfg)
    settings = sampling(cfg, tok, seed=0)
    assert tok.eos_token_id == 2 and settings.eos_token_id == 2 and settings.stop_token_ids == [9]
    assert generation_config(tok, cfg).eos_token_id == [2, 9]

    cfg = load_config(None, [f"model.student={bare}"])
    assert sampling(cfg, tok, seed=0).stop_token_ids == []
    assert generation_config(tok, cfg).eos_token_id == 2


def test_a_tokenizer_without_pad_token_is_left_as_it_is(tmp_path):
    """Llama 3 tokenizers have no pad token: batches pad with EOS (always masked), and the tokenizer the run
    saves with its checkpoints and exported student is the original, without an EOS-as-pad it never had."""
    import shutil

    from launch.config import load_config
    from trainer.checkpoint import save_student_files
    from trainer.roles import load_tokenizers, pad_id

    student = tmp_path / "student"
    shutil.copytree(resolve_path("builtin:tiny-student"), student)
    original = AutoTokenizer.from_pretrained(TOKENIZER)
    original.pad_token = None
    original.save_pretrained(student)
    tok = load_tokenizers(load_config(None, [f"model.student={student}", f"model.tokenizer={student}"]))
    assert tok.pad_token_id is None and pad_id(tok) == tok.eos_token_id
    from transformers import AutoConfig
    save_student_files(tmp_path / "saved", AutoConfig.from_pretrained(student), None, tok)
    assert AutoTokenizer.from_pretrained(tmp_path / "saved" / "student").pad_token is None
