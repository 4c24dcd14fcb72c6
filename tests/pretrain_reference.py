"""The pretraining term's figures at a run's first step, computed directly (shared by the loop tests)."""
import torch


def first_step_pretrain_losses(cfg) -> tuple[float, float]:
    """(mean NLL of the student, mean forward KL(teacher || student)) per target token over the pretraining
    windows a run serves first, with the initial models in fp64, one unpadded window at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.config import resolve_path
    from trainer.data import PretrainData, read_records

    tok = AutoTokenizer.from_pretrained(resolve_path(cfg.model.tokenizer or cfg.model.student))
    windows = PretrainData(read_records(cfg.data.pretrain), tok, cfg.data.pretrain_max_len, "data.pretrain",
                           seed=cfg.trainer.seed + 1).next_batch(cfg.rollout.prompts_per_step, tok.pad_token_id)
    models = [AutoModelForCausalLM.from_pretrained(resolve_path(p), dtype=torch.float64).eval()
              for p in (cfg.model.student, cfg.model.teacher)]
    nll, kl, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(len(windows)):
            ids = windows.sequences[i, :int(windows.prompt_lens[i] + windows.response_lens[i])]
            ls, lt = (torch.log_softmax(m(ids[None]).logits[0, :-1], -1) for m in models)
            nll -= float(ls.gather(-1, ids[1:, None]).sum())
            kl += float((lt.exp() * (lt - ls)).sum())
            n += len(ids) - 1
    return nll / n, kl / n
