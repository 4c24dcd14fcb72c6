"""trainer.student: the learner's student without dropout, and HF Trainer's weight-decay groups."""
import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from trainer.student import load_student, optimizer_groups


def _folder(tmp_path, config):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return str(tmp_path)


CONFIGS = {  # dropout in the config (Llama's attention reads it in forward) and in nn.Dropout modules (GPT-2)
    "llama": LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5),
    "gpt2": GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                       resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5),
}


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("init", ["pretrained", "from_config"])
def test_disable_dropout_gives_the_eval_mode_forward_in_train_mode(tmp_path, arch, init):
    path = _folder(tmp_path, CONFIGS[arch])
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = load_student(path, init, torch.float32, disable_dropout=True)
    reference = model.eval()(ids).logits  # eval mode: dropout off by definition
    model.train()
    torch.manual_seed(2)
    torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)

    torch.manual_seed(0)
    kept = load_student(path, init, torch.float32, disable_dropout=False).train()
    torch.manual_seed(2)
    assert not torch.allclose(kept(ids).logits, reference)  # the rates were real: without the switch they apply


@pytest.mark.parametrize("arch", CONFIGS)
def test_weight_decay_groups_follow_hf_trainer(tmp_path, arch):
    """Biases and norm weights do not decay; weight matrices and embeddings do. In these two architectures that is
    exactly the parameters with two or more dimensions (an independent rule), and one AdamW step shows it: with
    decay on, only those parameters move further, by lr * wd * w."""
    model = load_student(_folder(tmp_path, CONFIGS[arch]), "pretrained", torch.float32)
    groups = optimizer_groups(model, 0.1)
    decays = {id(p) for g in groups if g["decays"] for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in decays} == \
           {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = {}
    for wd in (0.0, 0.1):
        model.load_state_dict(start, strict=False)
        opt = torch.optim.AdamW(optimizer_groups(model, wd), lr=1e-2)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
        after[wd] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, w in start.items():
        expected = -1e-2 * 0.1 * w if w.dim() >= 2 else torch.zeros_like(w)
        torch.testing.assert_close(after[0.1][n] - after[0.0][n], expected, rtol=1e-4, atol=1e-7, msg=n)


def test_without_dropout_zeroes_every_training_only_noise():
    from transformers import MixtralConfig, OPTConfig

    from trainer.student import without_dropout
    opt = without_dropout(OPTConfig(dropout=0.1, attention_dropout=0.1, layerdrop=0.2, activation_dropout=0.1))
    assert (opt.dropout, opt.attention_dropout, opt.layerdrop, opt.activation_dropout) == (0.0, 0.0, 0.0, 0.0)
    moe = without_dropout(MixtralConfig(router_jitter_noise=0.01, attention_dropout=0.1))
    assert (moe.router_jitter_noise, moe.attention_dropout) == (0.0, 0.0)
    assert moe.hidden_size == MixtralConfig().hidden_size  # nothing else touched
