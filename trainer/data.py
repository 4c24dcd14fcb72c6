"""Prompt data: local jsonl/parquet or a cached Hugging Face dataset, tokenised once, validated early."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from launch.config import ConfigError, DataConfig, resolve_path
from rollout.types import RolloutBatch


def read_records(spec: str) -> list[dict]:
    """Rows of a `.jsonl`/`.parquet` file, or of `hf:NAME[:SPLIT]` (from the local datasets cache)."""
    if spec.startswith("hf:"):
        import datasets
        name, _, split = spec[3:].partition(":")
        try:
            return list(datasets.load_dataset(name, split=split or "train"))
        except Exception as e:  # not cached / no such split / offline: datasets' own message says which
            raise ConfigError(f"data source {spec!r} could not be loaded ({type(e).__name__}: {e}); give a dataset "
                              f"name or folder that datasets can load here, as hf:NAME[:SPLIT]") from e
    path = Path(resolve_path(spec))
    if not path.exists():
        raise ConfigError(f"data file {spec!r} not found (resolved to {path})")
    if path.suffix == ".jsonl":
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
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
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    raise ConfigError(f"data file {spec!r}: expected .jsonl or .parquet, or hf:NAME[:SPLIT]")


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
    """

    def __init__(self, records: list[dict], tokenizer, cfg: DataConfig, source: str, seed: int = 0,
                 limit: Optional[int] = None):
        if not records:
            raise ConfigError(f"{source}: no rows")
        if limit is not None:
            records = records[:limit]
        self.prompts: list[list[int]] = []
        self.responses: list[Optional[list[int]]] = []
        for i, row in enumerate(records):
            if cfg.prompt_key not in row:
                raise ConfigError(f"{source} row {i} has no field {cfg.prompt_key!r} (data.prompt_key); "
                                  f"fields: {', '.join(row)}")
            prompt, resp = prompt_and_response(row, cfg, f"{source} row {i}")
            ids = encode_prompt(tokenizer, prompt, cfg.chat_template, where=f"{source} row {i}")
            if len(ids) > cfg.max_prompt_len:
                raise ConfigError(f"{source} row {i}: prompt of {len(ids)} tokens exceeds data.max_prompt_len="
                                  f"{cfg.max_prompt_len}; raise it or shorten the prompt")
            self.prompts.append(ids)
            self.responses.append(None if resp is None else
                                  tokenizer(resp, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
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
    """
    prompt, resp = row[cfg.prompt_key], row.get(cfg.response_key)
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        if resp is not None:
            raise ConfigError(f"{where}: {cfg.prompt_key!r} ends with an assistant reply and {cfg.response_key!r} is "
                              f"set too; give the reply in one of them")
        prompt, resp = prompt[:-1], prompt[-1].get("content")
        if not prompt:
            raise ConfigError(f"{where}: {cfg.prompt_key!r} holds only an assistant reply, no prompt before it")
    elif isinstance(resp, list):
        if len(resp) != 1 or not isinstance(resp[0], dict) or resp[0].get("role") != "assistant":
            raise ConfigError(f"{where}: {cfg.response_key!r} as messages must be one assistant message, got {resp!r}")
        resp = resp[0].get("content")
    if resp is not None and not isinstance(resp, str):
        raise ConfigError(f"{where}: the response must be text, got {type(resp).__name__}")
    return prompt, resp


def encode_prompt(tokenizer, prompt, chat_template: bool, where: str = "a prompt") -> list[int]:
    if chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if tokenizer.chat_template is None:
            raise ConfigError("data.chat_template=true but the tokenizer has no chat template")
        # return_dict: transformers 5 returns a BatchEncoding here by default, 4.x a plain list
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: the prompt must be a string (or chat messages with data.chat_template=true), "
                          f"got {type(prompt).__name__}")
    return tokenizer(prompt)["input_ids"]
