"""Prompt data: local jsonl/parquet or a cached Hugging Face dataset, tokenised once, validated early."""
from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Optional

from launch.config import ConfigError, DataConfig, looks_like_hub_id, resolve_path
from rollout.types import RolloutBatch

log = logging.getLogger("minillm")


def read_records(spec: str) -> list[dict]:
    """Rows of a `.jsonl`/`.json`/`.parquet` file, of a `datasets` `save_to_disk` folder, or of
    `hf:NAME[:SPLIT]` (from the local datasets cache, or a `save_to_disk` folder's split)."""
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        if _is_saved_dataset(Path(resolve_path(name))):
            return _load_saved(spec, Path(resolve_path(name)), split or None)
        import datasets
        try:
            return list(datasets.load_dataset(name, split=split or "train"))
        except Exception as e:  # not cached / no such split / offline: datasets' own message says which
            raise ConfigError(f"data source {spec!r} could not be loaded ({type(e).__name__}: {e}); give a dataset "
                              f"name or folder that datasets can load here, as hf:NAME[:SPLIT]") from e
    path = Path(resolve_path(spec))
    if not path.exists():
        hint = ""
        if looks_like_hub_id(spec) and path.suffix not in (".jsonl", ".json", ".parquet"):
            hint = (f"; for the Hugging Face dataset {spec!r} give hf:{spec} (offline, it must already be in the "
                    f"local datasets cache)")
        raise ConfigError(f"data file {spec!r} not found (resolved to {path}){hint}")
    if path.is_dir():
        if _is_saved_dataset(path):
            return _load_saved(spec, path, None)
        raise ConfigError(f"data source {spec!r} is a folder but not one written by datasets' save_to_disk (no "
                          f"dataset_info.json/state.json or dataset_dict.json); give a file, or hf:FOLDER[:SPLIT] "
                          f"for a folder datasets.load_dataset reads")
    if path.suffix == ".jsonl":
        return _json_lines(spec, path.read_text())
    if path.suffix == ".json":
        text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # one broken document; "Extra data" is a second one: JSON lines
                raise ConfigError(f"data file {spec!r} is not JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
            return _json_lines(spec, text)
        if isinstance(data, dict):  # one object: a single JSON-lines row
            return _json_lines(spec, text) if "\n" not in text.strip() else _bad_json_shape(spec, data)
        if not isinstance(data, list):
            _bad_json_shape(spec, data)
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise ConfigError(f"data file {spec!r}: item {i} of the array is a JSON {type(row).__name__}, not an "
                                  f"object with named fields")
        return data
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    raise ConfigError(f"data file {spec!r}: expected .jsonl, .json or .parquet, a datasets save_to_disk folder, "
                      f"or hf:NAME[:SPLIT]")


def _json_lines(spec: str, text: str) -> list[dict]:
    rows = []
    for n, line in enumerate(io.StringIO(text), 1):  # lines end at "\n" only, as a file's do
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data file {spec!r} line {n} is not JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"data file {spec!r} line {n} is a JSON {type(row).__name__}, not an object "
                              f"with named fields")
        rows.append(row)
    return rows


def _bad_json_shape(spec: str, data) -> None:
    what = f"an object with fields {', '.join(map(repr, data))}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    raise ConfigError(f"data file {spec!r} holds {what}; expected an array of objects (one per row) or JSON lines "
                      f"(one object per line)")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _load_saved(spec: str, path: Path, split: Optional[str]) -> list[dict]:
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ConfigError(f"data source {spec!r}: datasets.load_from_disk failed ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want not in ds:
            raise ConfigError(f"data source {spec!r} is a DatasetDict without a {want!r} split; its splits: "
                              f"{', '.join(ds)}; choose one with hf:{path}:SPLIT")
        ds = ds[want]
    elif split:
        raise ConfigError(f"data source {spec!r}: the folder holds one Dataset (no splits), so drop ':{split}'")
    return list(ds)


class SeededOrder:
    """Indices 0..n-1 in a fresh seeded shuffle per epoch; (epoch, cursor) is the resumable position."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0
        self.order = self._order()

    def _order(self) -> list[int]:
        idx = list(range(self.n))
        random.Random(self.seed + self.epoch).shuffle(idx)
        return idx

    def next_indices(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.cursor >= len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order()
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n:
            raise ValueError(f"the saved position is for {state['n']} rows, this data has {self.n}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order()


class PromptData(SeededOrder):
    """Tokenised prompts (and, where present, the dataset's responses), served in a seeded order.

    The position (epoch, cursor) is part of the checkpoint so a resumed run draws the same prompts.
    `max_len` is the binding prompt limit (defaults to `cfg.max_prompt_len`; the loop passes the
    smaller of it and the context left beside rollout.max_new_tokens), `limit_reason` its name in
    messages. Longer prompts follow `cfg.long_prompts`.
    """

    def __init__(self, records: list[dict], tokenizer, cfg: DataConfig, source: str, seed: int = 0,
                 limit: Optional[int] = None, max_len: Optional[int] = None, limit_reason: Optional[str] = None):
        cfg.validate()
        if not records:
            raise ConfigError(f"{source}: no rows")
        if max_len is None:
            max_len, limit_reason = cfg.max_prompt_len, f"data.max_prompt_len={cfg.max_prompt_len}"
        limit_reason = limit_reason or f"{max_len} tokens"
        self.prompts: list[list[int]] = []
        self.responses: list[Optional[list[int]]] = []
        skipped, truncated, fallback = 0, 0, []
        for i, row in enumerate(records):
            if limit is not None and len(self.prompts) >= limit:
                break
            where = f"{source} row {i}"
            prompt, resp = prompt_and_response(row, cfg, where)
            templated = isinstance(prompt, list) or cfg.chat_template
            ids = whole = encode_prompt(tokenizer, prompt, cfg.chat_template, where=where)
            if len(ids) > max_len:
                if cfg.long_prompts == "skip":
                    skipped += 1
                    continue
                if cfg.long_prompts == "truncate_left":
                    ids, truncated = ids[-max_len:], truncated + 1
                else:
                    raise ConfigError(f"{where}: prompt of {len(ids)} tokens exceeds {limit_reason}; raise it, "
                                      f"shorten the prompt, or set data.long_prompts=skip or truncate_left")
            resp_ids = None
            if resp is not None:
                if templated:  # the ids the template writes for the reply, its end-of-turn token included
                    resp_ids = templated_response(tokenizer, prompt, resp, head=whole)
                    if resp_ids is None:
                        fallback.append(i)
                if resp_ids is None:
                    resp_ids = tokenizer(resp, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            self.prompts.append(ids)
            self.responses.append(resp_ids)
        if skipped:
            if not self.prompts:
                raise ConfigError(f"{source}: every prompt is longer than {limit_reason} (data.long_prompts=skip "
                                  f"dropped all {skipped}); raise the limit or set data.long_prompts=truncate_left")
            log.warning("%s: skipped %d prompt(s) longer than %s (data.long_prompts=skip)", source, skipped, limit_reason)
        if truncated:
            log.info("%s: kept the last %d tokens of %d prompt(s) (data.long_prompts=truncate_left)",
                     source, max_len, truncated)
        if fallback:
            rows = ", ".join(map(str, fallback[:5])) + (", ..." if len(fallback) > 5 else "")
            log.warning("%s row(s) %s: the chat template renders the prompt differently once the reply is added, so "
                        "the response was tokenised alone and closed with EOS (not the template's end of turn)",
                        source, rows)
        super().__init__(len(self.prompts), seed)


class PretrainData(SeededOrder):
    """MiniLLM's L_PT text: each document tokenised (with the tokenizer's BOS, if it adds one) and closed
    by EOS, then cut into windows of at most `max_len` tokens, served in a seeded order.

    Windows stay inside one document (no packing across documents, so no token attends to another
    document). In a window the first token is the context and the rest are the LM targets.
    """

    def __init__(self, records: list[dict], tokenizer, max_len: int, source: str, seed: int = 0,
                 text_key: str = "text"):
        if max_len < 2:
            raise ConfigError(f"data.pretrain_max_len must be >= 2 (one context token and one target), got {max_len}")
        self.windows: list[list[int]] = []
        for i, row in enumerate(records):
            text = row.get(text_key)
            if not isinstance(text, str):
                raise ConfigError(f"{source} row {i} has no string field {text_key!r}; fields: {', '.join(row)}")
            ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            self.windows += [w for w in (ids[j:j + max_len] for j in range(0, len(ids), max_len)) if len(w) >= 2]
        if not self.windows:
            raise ConfigError(f"{source}: no text of at least 2 tokens")
        super().__init__(len(self.windows), seed)

    def next_batch(self, n: int, pad_token_id: int) -> RolloutBatch:
        wins = [self.windows[i] for i in self.next_indices(n)]
        return RolloutBatch.from_lists([w[:1] for w in wins], [w[1:] for w in wins], pad_token_id, source="dataset")


def prompt_and_response(row: dict, cfg: DataConfig, where: str) -> tuple:
    """A row's prompt (text or chat messages) and response text (None when it has none).

    Besides plain text, the conversational forms of TRL datasets are read: the prompt field holding
    messages that end with the assistant's reply (a `messages` column: the reply is the response, the
    turns before it the prompt), and the response field holding `[{"role": "assistant", "content": ...}]`
    (prompt/completion). Either way the prompt never contains the reply, for training and evaluation.
    With the keys left at their defaults, a row without `prompt` is read from `messages` and one
    without `response` from `completion` (TRL's column names).
    """
    pkey, rkey = prompt_key_of(row, cfg), response_key_of(row, cfg)
    if pkey not in row:
        also = " nor 'messages' (read when data.prompt_key is left at 'prompt')" if cfg.prompt_key == "prompt" else ""
        raise ConfigError(f"{where} has no field {pkey!r} (data.prompt_key){also}; fields: {', '.join(row)}")
    prompt, resp = row[pkey], row.get(rkey)
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        if resp is not None:
            raise ConfigError(f"{where}: {pkey!r} ends with an assistant reply and {rkey!r} is "
                              f"set too; give the reply in one of them")
        prompt, resp = prompt[:-1], prompt[-1].get("content")
        if not prompt:
            raise ConfigError(f"{where}: {pkey!r} holds only an assistant reply, no prompt before it")
    elif isinstance(resp, list):
        if len(resp) != 1 or not isinstance(resp[0], dict) or resp[0].get("role") != "assistant":
            raise ConfigError(f"{where}: {rkey!r} as messages must be one assistant message, got {resp!r}")
        resp = resp[0].get("content")
    if resp is not None and not isinstance(resp, str):
        raise ConfigError(f"{where}: the response must be text, got {type(resp).__name__}")
    return prompt, resp


def prompt_key_of(row: dict, cfg: DataConfig) -> str:
    """data.prompt_key, or TRL's `messages` column when the key is left at its default and the row lacks it."""
    if cfg.prompt_key == "prompt" and "prompt" not in row and "messages" in row:
        return "messages"
    return cfg.prompt_key


def response_key_of(row: dict, cfg: DataConfig) -> str:
    """data.response_key, or TRL's `completion` column when the key is left at its default and the row lacks it."""
    if cfg.response_key == "response" and "response" not in row and "completion" in row:
        return "completion"
    return cfg.response_key


def _is_messages(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    # return_dict: transformers 5 returns a BatchEncoding here by default, 4.x a plain list
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=True)["input_ids"])


def encode_prompt(tokenizer, prompt, chat_template: bool, where: str = "a prompt") -> list[int]:
    """A prompt's ids: chat messages (and, with data.chat_template=true, text as one user turn) through the
    tokenizer's chat template with the assistant's generation prompt; else the text's ids."""
    if isinstance(prompt, list) or chat_template:
        if isinstance(prompt, list) and not _is_messages(prompt):
            raise ConfigError(f"{where}: the prompt must be a string or a list of chat messages "
                              f"({{'role': ..., 'content': ...}}), got {prompt!r:.120}")
        if tokenizer.chat_template is None:
            if isinstance(prompt, list):
                raise ConfigError(f"{where}: the prompt is chat messages but the tokenizer has no chat template to "
                                  f"encode them; give model.tokenizer a tokenizer with one, or plain-text prompts")
            raise ConfigError("data.chat_template=true but the tokenizer has no chat template")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return _render(tokenizer, messages, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: the prompt must be a string or a list of chat messages, "
                          f"got {type(prompt).__name__}")
    return tokenizer(prompt)["input_ids"]


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones (BOS, EOS, ...) and every added token flagged special,
    which is how some instruct tokenizers ship their end-of-turn token without naming it."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


def templated_response(tokenizer, prompt, reply: str, head: Optional[list[int]] = None) -> Optional[list[int]]:
    """The reply's ids as the chat template writes the assistant turn: the whole conversation rendered, less the
    prompt's ids (with the generation prompt), as TRL computes a completion. So the turn ends with the template's
    end-of-turn token (Llama 3's <|eot_id|>, Qwen's <|im_end|>, Gemma's <end_of_turn>), the token the student emits
    when it samples. Whitespace the template writes after that last special token (Qwen's newline) is dropped: the
    sampler stops at the token, so no sampled response holds it. A turn the template closes with no special token
    is closed by EOS, as a plain-text response is. None when the prompt's ids are not a prefix of the
    conversation's (templates that rewrite earlier turns). `head`: the prompt's ids, when already rendered."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if head is None:
        head = _render(tokenizer, messages, add_generation_prompt=True)
    full = _render(tokenizer, messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    if len(full) <= len(head) or full[:len(head)] != head:
        return None
    rest = full[len(head):]
    specials = special_ids(tokenizer)
    last = max((j for j, t in enumerate(rest) if t in specials), default=None)
    if last is not None and not tokenizer.decode(rest[last + 1:]).strip():
        rest = rest[:last + 1]
    if rest[-1] not in specials:
        rest = rest + [tokenizer.eos_token_id]
    return rest
