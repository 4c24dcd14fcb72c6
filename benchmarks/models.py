"""Random-weight Llama model folders of realistic shapes, built from a config: no downloads.

    python -m benchmarks.models --out /tmp/bench_models/student --shape 0.5b --vocab 32000
    python -m benchmarks.models --out /tmp/bench_models/teacher --shape 1.5b --vocab 32000 --seed 1 --device cuda

A folder holds what every consumer of a model folder reads: `config.json` (LlamaForCausalLM),
`model.safetensors` (Hugging Face's own init, normal(0, 0.02), seeded), `generation_config.json`,
and a tokenizer whose vocabulary has exactly `vocab` entries, so `AutoTokenizer`, our trainer, vLLM
and TRL all load the folder. Student and teacher built with the same `--vocab` share the tokenizer.

The tokenizer is word-level (`tokenizers` WordLevel, whitespace split): ids 0-3 are <pad>, <s>, </s>,
<unk>; id i >= 4 is the word "w{i}". It prepends <s> (as Llama's does) and has no chat template.
`prompt_texts` makes prompt strings that tokenise to an exact length in every consumer.

`generation_config.json` carries no EOS id: `generate()` fills the EOS ids it is not given from the
model's generation config, so a benchmark that passes none gets fixed-length responses; `config.json`
keeps eos_token_id=2 (the tokenizer's </s>) for the consumers that read it there.

Shapes follow public models (attention/MLP widths, depth, heads, KV heads, tied embeddings); the
vocabulary is a separate choice (32000 = Llama 2, 128256 = Llama 3):

    shape          modelled on     hidden  inter   layers  heads  kv  tied
    tiny           (CPU tests)         64    128        2      4   2  no
    tiny-teacher   (CPU tests)        128    256        4      4   2  no
    135m           SmolLM-135M        576   1536       30      9   3  yes
    0.5b           Qwen2.5-0.5B       896   4864       24     14   2  yes
    1b             Llama-3.2-1B      2048   8192       16     32   8  yes
    1.5b           Qwen2.5-1.5B      1536   8960       28     12   2  yes
    3b             Llama-3.2-3B      3072   8192       28     24   8  yes
    8b             Llama-3.1-8B      4096  14336       32     32   8  no
(Qwen's QKV biases are left out: these are Llama-style, bias-free.)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# name: (hidden, intermediate, layers, heads, kv_heads, tie_word_embeddings, default vocab)
SHAPES = {
    "tiny": (64, 128, 2, 4, 2, False, 512),
    "tiny-teacher": (128, 256, 4, 4, 2, False, 512),
    "135m": (576, 1536, 30, 9, 3, True, 32000),
    "0.5b": (896, 4864, 24, 14, 2, True, 32000),
    "1b": (2048, 8192, 16, 32, 8, True, 128256),
    "1.5b": (1536, 8960, 28, 12, 2, True, 32000),
    "3b": (3072, 8192, 28, 24, 8, True, 32000),
    "8b": (4096, 14336, 32, 32, 8, False, 128256),
}


def llama_config(shape: str, vocab: int | None = None, max_position_embeddings: int = 4096):
    """The LlamaConfig of a named shape with `vocab` entries (default: the shape's)."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    hidden, inter, layers, heads, kv, tied, default_vocab = SHAPES[shape]
    vocab = vocab or default_vocab
    if vocab <= len(SPECIALS):
        raise ValueError(f"vocab must be > {len(SPECIALS)} (the special tokens), got {vocab}")
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=tied,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


# ---- parameter and FLOP counts (closed forms) -------------------------------------------------


def _dims(cfg):
    d, L, H = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    kv = cfg.num_key_value_heads or H
    hd = getattr(cfg, "head_dim", None) or d // H
    return d, cfg.intermediate_size, L, H, kv, hd, cfg.vocab_size


def _layer_matmul_params(cfg) -> int:
    """Weights of one decoder layer's matmuls: q (d×H·hd), k and v (d×KV·hd each), o (H·hd×d), and the
    SwiGLU MLP's gate, up (d×I each) and down (I×d)."""
    d, inter, _, H, kv, hd, _ = _dims(cfg)
    return d * hd * (2 * H + 2 * kv) + 3 * d * inter


def param_count(cfg) -> int:
    """Parameters of a (bias-free) LlamaForCausalLM:
    V·d (embeddings) [+ V·d (untied LM head)] + L·(matmuls + 2 RMSNorm weights of d) + d (final norm)."""
    d, _, L, _, _, _, V = _dims(cfg)
    return V * d * (1 if cfg.tie_word_embeddings else 2) + L * (_layer_matmul_params(cfg) + 2 * d) + d


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token: the decoder's and the LM head's (V·d, tied or not).
    The input embedding is a lookup (no FLOPs); RMSNorm weights are elementwise."""
    d, _, L, _, _, _, V = _dims(cfg)
    return L * _layer_matmul_params(cfg) + V * d


def train_flops(cfg, seq_len: int, logit_positions: int | None = None, num_seqs: int = 1) -> float:
    """Model FLOPs of forward + backward over `num_seqs` sequences of `seq_len` tokens, the LM head applied at
    `logit_positions` positions of each (default: all; our learner applies it at the response positions only).

    The count of PaLM (Chowdhery et al. 2022, arXiv 2204.02311) appendix B, as in Chinchilla (Hoffmann et al.
    2022, arXiv 2203.15556) appendix F: a matmul with P weights costs 2P FLOPs per token forward and 4P backward
    (the input's and the weight's gradients), so 6 per weight per token; attention adds, per layer and token,
    2·T·H·hd for the scores QKᵀ and 2·T·H·hd for the weighted sum of V forward, again ×3 with the backward:
    12·L·H·hd·T per token, T the sequence length, H the query heads (GQA shares K/V but not these products).
    Full T×T score matrices are counted (no causal discount), as PaLM does; elementwise work (norms, softmax,
    SwiGLU's product, RoPE) is not counted. Per sequence:

        6·N_dec·T + 6·V·d·R + 12·L·H·hd·T²,   N_dec = decoder matmul weights, R = logit positions.
    """
    d, _, L, H, _, hd, V = _dims(cfg)
    R = seq_len if logit_positions is None else logit_positions
    per_seq = 6 * L * _layer_matmul_params(cfg) * seq_len + 6 * V * d * R + 12 * L * H * hd * seq_len ** 2
    return float(num_seqs * per_seq)


def train_flops_per_token(cfg, seq_len: int) -> float:
    """PaLM's per-token form, 6·N + 12·L·H·hd·T with N = `matmul_params` (the LM head at every position)."""
    _, _, L, H, _, hd, _ = _dims(cfg)
    return 6.0 * matmul_params(cfg) + 12.0 * L * H * hd * seq_len


# ---- tokenizer and prompts --------------------------------------------------------------------


def build_tokenizer(vocab_size: int, model_max_length: int = 4096):
    """Word-level fast tokenizer with exactly `vocab_size` entries (ids >= 4 are "w{id}"), BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces (no word starts with ##)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def prompt_texts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[str]:
    """`num` prompt strings of `length` tokens each once the tokenizer prepends <s> (length − 1 random words)."""
    if length < 1:
        raise ValueError(f"length must be >= 1 (the BOS token), got {length}")
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(len(SPECIALS), vocab_size)}" for _ in range(length - 1)) for _ in range(num)]


# ---- a model folder ---------------------------------------------------------------------------


def build(out: str, shape: str, vocab: int | None = None, seed: int = 0, device: str = "cpu",
          dtype: str = "bfloat16", max_position_embeddings: int = 4096) -> dict:
    """Write a random-weight model folder (config, safetensors, generation config, tokenizer); returns its
    description (also written as `bench_model.json`)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = llama_config(shape, vocab, max_position_embeddings)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it is fast (a 3B init takes minutes on one CPU core)
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, pad_token_id=PAD_ID)  # no EOS: see the docstring
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(cfg.vocab_size, max_position_embeddings).save_pretrained(out)
    info = {"shape": shape, "vocab": cfg.vocab_size, "seed": seed, "dtype": dtype, "params": n_params,
            "params_closed_form": param_count(cfg), "max_position_embeddings": max_position_embeddings}
    with open(os.path.join(out, "bench_model.json"), "w") as f:
        json.dump(info, f, indent=2)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return info


def ensure(out: str, shape: str, vocab: int | None = None, seed: int = 0, device: str = "cpu",
           dtype: str = "bfloat16", max_position_embeddings: int = 4096) -> dict:
    """`build` unless `out` already holds this exact model (same shape, vocab, seed, dtype)."""
    want = {"shape": shape, "vocab": llama_config(shape, vocab).vocab_size, "seed": seed, "dtype": dtype,
            "max_position_embeddings": max_position_embeddings}
    path = os.path.join(out, "bench_model.json")
    if os.path.exists(path) and os.path.exists(os.path.join(out, "model.safetensors")):
        with open(path) as f:
            info = json.load(f)
        if all(info.get(k) == v for k, v in want.items()):
            return info
    return build(out, shape, vocab, seed, device, dtype, max_position_embeddings)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the shape's; 32000, 128256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for >= 1B)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-position-embeddings", type=int, default=4096)
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder holds this model")
    args = ap.parse_args(argv)
    fn = build if args.force else ensure
    info = fn(args.out, args.shape, args.vocab, args.seed, args.device, args.dtype, args.max_position_embeddings)
    print(json.dumps(info))


if __name__ == "__main__":
    sys.exit(main())
