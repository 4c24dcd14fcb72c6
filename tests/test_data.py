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
    ({"prompt": "the red fox", "response": "the cat eats"}, {"chat_template": True}),  # plain text through the template
    ({"messages": [{"role": "user", "content": "the red fox"}, {"role": "assistant", "content": "the cat eats"}]},
     {"prompt_key": "messages"}),  # TRL's `messages` column: the last assistant turn is the response
    ({"prompt": [{"role": "user", "content": "the red fox"}], "completion": [{"role": "assistant", "content": "the cat eats"}]},
     {"response_key": "completion"}),  # TRL's conversational prompt/completion
    # the keys left at their defaults: TRL's column names are found, and chat messages always get the template
    ({"messages": [{"role": "user", "content": "the red fox"}, {"role": "assistant", "content": "the cat eats"}]}, {}),
    ({"prompt": [{"role": "user", "content": "the red fox"}], "completion": [{"role": "assistant", "content": "the cat eats"}]}, {}),
    ({"prompt": [{"role": "user", "content": "the red fox"}], "completion": "the cat eats"}, {}),
])
def test_chat_rows_give_the_templated_prompt_without_the_reply(chat_tok, row, cfg):
    data = PromptData([row], chat_tok, DataConfig(**cfg), "data.prompts")
    assert data.prompts == [[chat_tok.bos_token_id] + _ids(chat_tok, "alice the red fox . bob")]
    # the reply as the template writes it ("the cat eats . "); the turn has no special end token, so EOS closes it
    assert data.responses == [_ids(chat_tok, "the cat eats .") + [chat_tok.eos_token_id]]


def test_a_multi_turn_conversation_keeps_earlier_replies_in_the_prompt(chat_tok):
    msgs = [{"role": "user", "content": "the red fox"}, {"role": "assistant", "content": "the cat"},
            {"role": "user", "content": "the dog"}, {"role": "assistant", "content": "the bird eats"}]
    data = PromptData([{"messages": msgs}], chat_tok, DataConfig(chat_template=True, prompt_key="messages"), "e")
    assert data.prompts == [[chat_tok.bos_token_id] + _ids(chat_tok, "alice the red fox . bob the cat . alice the dog . bob")]
    assert data.responses == [_ids(chat_tok, "the bird eats .") + [chat_tok.eos_token_id]]


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
    with pytest.raises(ConfigError, match=r"row 0: the prompt is chat messages but the tokenizer has no chat template"):
        PromptData([{"prompt": [user]}], tok, DataConfig(), "data.prompts")
    with pytest.raises(ConfigError, match=r"^data.chat_template=true but the tokenizer has no chat template"):
        PromptData([{"prompt": "the red fox"}], tok, DataConfig(chat_template=True), "data.prompts")
    with pytest.raises(ConfigError, match=r"row 0: the prompt must be a string or a list of chat messages"):
        PromptData([{"prompt": ["the", "red"]}], chat_tok, DataConfig(), "data.prompts")


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
    with pytest.raises(ConfigError, match=r"expected \.jsonl, \.json or \.parquet, a datasets save_to_disk folder, or hf:NAME\[:SPLIT\]"):
        read_records(str(tmp_path / "p.csv"))
    with pytest.raises(ConfigError, match="could not be loaded .*hf:NAME"):
        read_records(f"hf:{tmp_path / 'no_such_dataset'}")
    with pytest.raises(ConfigError, match="data.prompts: no rows"):
        PromptData([], tok, DataConfig(), "data.prompts")
    with pytest.raises(ConfigError, match=r"row 1 has no field 'prompt' \(data.prompt_key\) nor 'messages' .*fields: text"):
        PromptData([{"prompt": "the"}, {"text": "the"}], tok, DataConfig(), "data.prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the"}\n\n{"prompt": "the red\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl' line 3 is not JSON: .* \(column 20\)"):
        read_records(str(bad))
    bad.write_text('{"prompt": "the"}\n["the", "red"]\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl' line 2 is a JSON list, not an object"):
        read_records(str(bad))
    with pytest.raises(ConfigError, match=r"row 0 has no field 'question' \(data.prompt_key\); fields: messages$"):
        PromptData([{"messages": [{"role": "user", "content": "the"}]}], tok, DataConfig(prompt_key="question"), "d")
    with pytest.raises(ConfigError, match="data.prompts row 1: the prompt must be a string .*got int"):
        PromptData([{"prompt": "the"}, {"prompt": 7}], tok, DataConfig(), "data.prompts")


def test_off_policy_gkd_without_responses_fails_before_any_actor(tmp_path):
    import json

    from launch.config import load_config
    from trainer.loop import load_data
    from trainer.roles import load_tokenizers

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = load_config("gkd_cpu", [f"data.prompts={tmp_path / 'p.jsonl'}", "objective.lam=0.5"])
    with pytest.raises(ConfigError, match=r"objective.lam=0.5 < 1 uses the dataset's responses.*data.response_key\), "
                                          r"no 'completion' field and no 'messages' ending with an assistant reply"):
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


# ---- data.long_prompts ----------------------------------------------------------------------

LONG = "the red fox follows the rabbit . " * 4  # 28 words + BOS = 29 tokens


def test_long_prompts_skip_drops_the_rows_with_one_warning(tok, caplog):
    rows = [{"prompt": "the red fox", "response": "the cat"}, {"prompt": LONG, "response": "the dog"},
            {"prompt": "alice has", "response": "the bird"}, {"prompt": LONG + "alice", "response": "the cow"}]
    assert len(tok(LONG)["input_ids"]) == 29
    with caplog.at_level("WARNING", logger="minillm"):
        data = PromptData(rows, tok, DataConfig(max_prompt_len=16, long_prompts="skip"), "data.prompts")
    assert data.prompts == [tok("the red fox")["input_ids"], tok("alice has")["input_ids"]]
    assert data.responses == [tok("the cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                              tok("the bird", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert data.n == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["data.prompts: skipped 2 prompt(s) longer than data.max_prompt_len=16 (data.long_prompts=skip)"]
    with pytest.raises(ConfigError, match=r"data.prompts: every prompt is longer than data.max_prompt_len=16 .*all 2"):
        PromptData([rows[1], rows[3]], tok, DataConfig(max_prompt_len=16, long_prompts="skip"), "data.prompts")
    # eval's num_eval_prompts counts the kept rows
    data = PromptData(rows, tok, DataConfig(max_prompt_len=16, long_prompts="skip"), "data.eval_prompts", limit=2)
    assert data.prompts == [tok("the red fox")["input_ids"], tok("alice has")["input_ids"]]


def test_long_prompts_truncate_left_keeps_the_last_tokens(tok):
    rows = [{"prompt": LONG}, {"prompt": "the red fox"}]
    data = PromptData(rows, tok, DataConfig(max_prompt_len=16, long_prompts="truncate_left"), "data.prompts")
    # independent: the last 16 words of the text by vocabulary lookup (BOS and the first 13 words are cut)
    assert data.prompts[0] == tok.convert_tokens_to_ids(LONG.split()[-16:])
    assert data.prompts[1] == tok("the red fox")["input_ids"]
    with pytest.raises(ConfigError, match=r"row 0: prompt of 29 tokens exceeds data.max_prompt_len=16; .*"
                                          r"data.long_prompts=skip or truncate_left"):
        PromptData(rows, tok, DataConfig(max_prompt_len=16), "data.prompts")


def test_long_prompts_value_is_validated():
    from launch.config import load_config

    with pytest.raises(ConfigError, match=r"data.long_prompts must be one of 'error', 'skip', 'truncate_left', got 'drop'"):
        DataConfig(long_prompts="drop").validate()
    with pytest.raises(ConfigError, match=r"data.long_prompts must be one of 'error', 'skip', 'truncate_left', got 'drop'"):
        load_config(None, ["data.long_prompts=drop"])
    assert load_config(None, ["data.long_prompts=skip"]).data.long_prompts == "skip"


def test_long_prompts_apply_to_the_students_context(tmp_path):
    """A student of 64 positions with rollout.max_new_tokens=24 takes prompts of at most 40 tokens, even under
    data.max_prompt_len=256: "error" fails before any actor, skip/truncate_left give data that passes the check."""
    import json
    import shutil

    from launch.config import load_config
    from trainer.loop import load_data
    from trainer.roles import check_context, load_tokenizers

    student = tmp_path / "student"
    shutil.copytree(resolve_path("builtin:tiny-student"), student)
    conf = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": 64}))
    text = "the red fox follows the rabbit . " * 7  # 49 words + BOS = 50 tokens: under 256, over 64 - 24
    rows = [{"prompt": "the red fox"}, {"prompt": text}, {"prompt": "alice has"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"model.student={student}", f"model.tokenizer={resolve_path('builtin:tokenizer')}",
            f"data.prompts={tmp_path / 'p.jsonl'}", f"data.eval_prompts={tmp_path / 'p.jsonl'}",
            "rollout.max_new_tokens=24"]

    def sets(data):
        return {"data.prompts": data.train.prompts, "data.eval_prompts": data.eval.prompts}

    cfg = load_config(None, base)
    tok = load_tokenizers(cfg)
    data = load_data(cfg, tok)
    with pytest.raises(ConfigError, match=r"data.prompts: a prompt of 50 tokens \+ rollout.max_new_tokens=24 "
                                          r"exceeds the student's context of 64 tokens; .*data.long_prompts=skip or truncate_left"):
        check_context(cfg, sets(data))

    cfg = load_config(None, base + ["data.long_prompts=skip"])
    data = load_data(cfg, tok)
    short = [tok("the red fox")["input_ids"], tok("alice has")["input_ids"]]
    assert data.train.prompts == short and data.eval.prompts == short
    check_context(cfg, sets(data))

    cfg = load_config(None, base + ["data.long_prompts=truncate_left"])
    data = load_data(cfg, tok)
    cut = tok.convert_tokens_to_ids(text.split()[-40:])
    assert data.train.prompts == [short[0], cut, short[1]] and data.eval.prompts == data.train.prompts
    check_context(cfg, sets(data))

    cfg = load_config(None, base + ["data.long_prompts=skip", "rollout.max_new_tokens=64"])
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens=64 leaves no room for a prompt in the student's "
                                          r"context of 64 tokens"):
        load_data(cfg, tok)


# ---- responses through the chat template ----------------------------------------------------

# a template whose assistant turn ends with a special end-of-turn token "<eot>" (not EOS) and a newline after
# it, as Qwen's "<|im_end|>\n" or Llama 3's "<|eot_id|>"; user turns end with " . "
EOT_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}alice {{ m['content'] }} . "
            "{% else %}bob {{ m['content'] }} <eot>\n{% endif %}{% endfor %}{% if add_generation_prompt %}bob {% endif %}")


@pytest.fixture(params=["named", "unnamed"])
def eot_tok(request):
    """named: <eot> among the tokenizer's special tokens; unnamed: an added token flagged special that no special
    token attribute names (as some instruct tokenizers ship their end-of-turn token)."""
    from tokenizers import AddedToken

    t = AutoTokenizer.from_pretrained(TOKENIZER)
    if request.param == "named":
        t.add_special_tokens({"additional_special_tokens": ["<eot>"]})
    else:
        t.add_tokens([AddedToken("<eot>", normalized=False, special=True)])
        assert t.convert_tokens_to_ids("<eot>") not in t.all_special_ids
    t.add_tokens([AddedToken("\n", normalized=False, special=False)])  # a real token, as "\n" is in BPE vocabularies
    t.chat_template = EOT_CHAT
    return t


def test_dataset_responses_end_with_the_templates_end_of_turn_token(eot_tok):
    t = eot_tok
    eot, nl = t.convert_tokens_to_ids("<eot>"), t.convert_tokens_to_ids("\n")
    assert eot not in (t.eos_token_id, t.unk_token_id, None) and nl not in (t.unk_token_id, None) and eot != nl
    user = {"role": "user", "content": "the red fox"}
    # the template writes a newline token after <eot> (the case the trimming is for)
    full = t.apply_chat_template([user, {"role": "assistant", "content": "the cat eats"}], tokenize=True,
                                 return_dict=True)["input_ids"]
    assert list(full[-2:]) == [eot, nl]
    rows = [{"prompt": "the red fox", "response": "the cat eats"},
            {"messages": [user, {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "the dog"},
                          {"role": "assistant", "content": "the bird eats"}]},
            {"prompt": [user], "completion": [{"role": "assistant", "content": "the cow"}]}]
    data = PromptData(rows, t, DataConfig(chat_template=True), "data.prompts")
    # by hand from the template: "bob " opens the turn (in the prompt), then the reply, then <eot>; the newline after
    # <eot> is dropped (sampling stops at <eot>), and no EOS is added
    assert data.prompts == [[t.bos_token_id] + _ids(t, "alice the red fox . bob"),
                            [t.bos_token_id] + _ids(t, "alice the red fox . bob the cat") + [eot, nl]
                            + _ids(t, "alice the dog . bob"),
                            [t.bos_token_id] + _ids(t, "alice the red fox . bob")]
    assert data.responses == [_ids(t, "the cat eats") + [eot], _ids(t, "the bird eats") + [eot], _ids(t, "the cow") + [eot]]
    # without the template a plain-text response is its text closed by EOS
    data = PromptData(rows[:1], t, DataConfig(), "data.prompts")
    assert data.responses == [_ids(t, "the cat eats") + [t.eos_token_id]]


def test_a_template_that_rewrites_the_prompt_falls_back_with_a_warning(eot_tok, caplog):
    # the generation prompt ("bob has") is not what the assistant turn starts with ("bob "), so the prompt's ids
    # are not a prefix of the conversation's
    eot_tok.chat_template = EOT_CHAT.replace("{% if add_generation_prompt %}bob {% endif %}",
                                             "{% if add_generation_prompt %}bob has {% endif %}")
    rows = [{"prompt": "the red fox", "response": "the cat eats"}, {"prompt": "alice has", "response": "the dog"}]
    with caplog.at_level("WARNING", logger="minillm"):
        data = PromptData(rows, eot_tok, DataConfig(chat_template=True), "data.prompts")
    assert data.responses == [_ids(eot_tok, "the cat eats") + [eot_tok.eos_token_id],
                              _ids(eot_tok, "the dog") + [eot_tok.eos_token_id]]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("data.prompts row(s) 0, 1: the chat template renders the prompt")


# ---- sources: .json, save_to_disk folders, Hub ids -----------------------------------------------

def test_json_files_hold_an_array_or_json_lines(tmp_path):
    import json

    from trainer.data import read_records

    (tmp_path / "array.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "one.json").write_text(json.dumps(ROWS[0]) + "\n")
    assert read_records(str(tmp_path / "array.json")) == ROWS
    assert read_records(str(tmp_path / "lines.json")) == ROWS
    assert read_records(str(tmp_path / "one.json")) == ROWS[:1]
    bad = tmp_path / "bad.json"
    for content, message in [
        (json.dumps({"data": ROWS}, indent=2), (r"bad.json' holds an object with fields 'data'; expected an array of "
                                                r"objects \(one per row\) or JSON lines")),
        ("7", r"bad.json' holds a JSON int; expected an array of objects"),
        (json.dumps([ROWS[0], "the red fox"]), r"bad.json': item 1 of the array is a JSON str, not an object"),
        ('[{"prompt": "the"', r"bad.json' is not JSON: .*line 1 column 18"),
        ('{"prompt": "the"}\n{"prompt": "the red\n', r"bad.json' line 2 is not JSON"),
    ]:
        bad.write_text(content)
        with pytest.raises(ConfigError, match=message):
            read_records(str(bad))


def test_datasets_save_to_disk_folders(tmp_path):
    import datasets

    from trainer.data import read_records

    other = [{"prompt": "the dog", "response": "the cat"}]
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(other)}).save_to_disk(str(tmp_path / "dd"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(other)}).save_to_disk(str(tmp_path / "nodd"))
    assert read_records(str(tmp_path / "ds")) == ROWS
    assert read_records(str(tmp_path / "dd")) == ROWS  # a DatasetDict's "train" split
    assert read_records(f"hf:{tmp_path / 'dd'}:test") == other
    assert read_records(f"hf:{tmp_path / 'ds'}") == ROWS
    with pytest.raises(ConfigError, match=r"nodd' is a DatasetDict without a 'train' split; its splits: validation, "
                                          r"test; choose one with hf:.*nodd:SPLIT"):
        read_records(str(tmp_path / "nodd"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=r"plain' is a folder but not one written by datasets' save_to_disk"):
        read_records(str(tmp_path / "plain"))


def test_a_missing_source_that_looks_like_a_hub_id_suggests_hf(tmp_path, monkeypatch):
    from trainer.data import read_records

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data file 'trl-lib/tldr' not found .*; for the Hugging Face dataset "
                                          r"'trl-lib/tldr' give hf:trl-lib/tldr \(offline, it must already be in the "
                                          r"local datasets cache\)"):
        read_records("trl-lib/tldr")
    with pytest.raises(ConfigError) as e:
        read_records("data/train.jsonl")
    assert "not found" in str(e.value) and "hf:" not in str(e.value)
