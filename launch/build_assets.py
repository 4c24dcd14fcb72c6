"""Build the embedded default's assets reproducibly: corpus, tokenizer, tiny teacher, tiny student.

    python -m launch.build_assets            # rebuild everything into launch/assets/

The corpus is a small synthetic language (seeded): sentences about animals with verb-object
agreement, counting runs and one-digit additions, so that a trained teacher has real structure
to pass on (its next-token distribution is far from anything a random student produces).
The teacher is a 4-layer Llama trained on it for a few CPU minutes; the student is a 2-layer Llama
briefly fine-tuned on the same text (MiniLLM starts from an SFT student).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
ANIMALS = {  # animal -> (verbs, objects it goes with)
    "cat": (["chases", "watches"], ["mouse", "bird", "ball"]),
    "dog": (["fetches", "chews"], ["stick", "bone", "ball"]),
    "bird": (["eats", "finds"], ["seed", "worm", "berry"]),
    "fox": (["hunts", "follows"], ["rabbit", "mouse", "bird"]),
    "cow": (["eats", "smells"], ["grass", "hay", "flower"]),
}
ADJECTIVES = ["small", "big", "red", "brown", "quiet", "happy", "old", "young"]
PLACES = ["garden", "forest", "field", "house", "river"]
NAMES = ["alice", "bob", "carol", "dave"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _animal_sentence(rng: random.Random) -> str:
    animal = rng.choice(sorted(ANIMALS))
    verbs, objects = ANIMALS[animal]
    adj = rng.choice(ADJECTIVES)
    s = f"the {adj} {animal} {rng.choice(verbs)} the {rng.choice(objects)}"
    if rng.random() < 0.5:
        s += f" in the {rng.choice(PLACES)}"
    return s + " ."


def _count_sentence(rng: random.Random) -> str:
    start = rng.randint(0, 5)
    n = rng.randint(3, 6)
    return "count " + " ".join(NUMBERS[start:start + n]) + " ."


def _sum_sentence(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{name} has {NUMBERS[a]} apples and gets {NUMBERS[b]} more so {name} has {NUMBERS[a + b]} apples ."


def make_corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    makers = [_animal_sentence, _animal_sentence, _count_sentence, _sum_sentence]
    lines = []
    for _ in range(n_lines):
        k = rng.randint(1, 2)
        lines.append(" ".join(rng.choice(makers)(rng) for _ in range(k)))
    return lines


def vocabulary() -> list[str]:
    words = set(NUMBERS) | set(ADJECTIVES) | set(PLACES) | set(NAMES) | set(ANIMALS)
    for verbs, objects in ANIMALS.values():
        words |= set(verbs) | set(objects)
    words |= {"the", "in", "count", "has", "apples", "and", "gets", "more", "so", "."}
    return SPECIALS + sorted(words)


def build_tokenizer(out_dir: Path):
    """A word-level fast tokenizer (whitespace split), saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def train_lm(cfg, tokenizer, lines: list[str], out_dir: Path, steps: int, seed: int, lr: float = 3e-3) -> float:
    """Next-token training on the corpus; returns the final held-out loss (nats/token)."""
    from transformers import LlamaForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    ids = [tokenizer(line)["input_ids"] + [tokenizer.eos_token_id] for line in lines]
    held_out, train = ids[:200], ids[200:]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)

    def batch(rows):
        L = max(len(r) for r in rows)
        x = torch.full((len(rows), L), tokenizer.pad_token_id)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r)
        labels = x.masked_fill(x == tokenizer.pad_token_id, -100)
        return x, (x != tokenizer.pad_token_id).long(), labels

    model.train()
    for step in range(steps):
        idx = torch.randint(len(train), (32,), generator=g).tolist()
        x, attn, labels = batch([train[i] for i in idx])
        loss = model(input_ids=x, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"{out_dir.name} step {step} loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        x, attn, labels = batch(held_out)
        eval_loss = model(input_ids=x, attention_mask=attn, labels=labels).loss.item()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return eval_loss


def write_prompts(lines: list[str], path: Path, seed: int) -> None:
    """Prompts are the first 2-4 words of a corpus line; the rest is the dataset's response."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for line in lines:
            words = line.split()
            k = rng.randint(2, 4)
            f.write(json.dumps({"prompt": " ".join(words[:k]), "response": " ".join(words[k:])}) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ASSETS))
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--student-steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)

    lines = make_corpus(6000, args.seed)
    (out / "corpus" / "train.txt").write_text("\n".join(lines[:5000]) + "\n")
    write_prompts(lines[5000:5800], out / "corpus" / "prompts_train.jsonl", args.seed)
    write_prompts(lines[5800:], out / "corpus" / "prompts_eval.jsonl", args.seed + 1)
    with open(out / "corpus" / "pretrain.jsonl", "w") as f:
        for line in lines[:1000]:
            f.write(json.dumps({"text": line}) + "\n")

    tokenizer = build_tokenizer(out / "tokenizer")
    uniform = torch.log(torch.tensor(float(len(tokenizer)))).item()
    teacher_cfg = llama_config(len(tokenizer), 128, 4, 4, tokenizer)
    loss = train_lm(teacher_cfg, tokenizer, lines[:5000], out / "tiny-teacher", args.teacher_steps, args.seed)
    print(f"teacher held-out loss {loss:.3f} nats/token (uniform: {uniform:.3f})")
    # The student starts as MiniLLM's do, from a (here: brief, under-trained) fine-tune on the same text:
    # it writes the language's words but has not learned the facts the teacher knows.
    student_cfg = llama_config(len(tokenizer), 64, 2, 2, tokenizer)
    loss = train_lm(student_cfg, tokenizer, lines[:5000], out / "tiny-student", args.student_steps, args.seed + 1, lr=1e-3)
    print(f"student held-out loss {loss:.3f} nats/token")


if __name__ == "__main__":
    main()
