"""The learner's objective glue, from config to loss: every divergence objective, its parameter and its
temperature reach the loss as configured, with the teacher's distribution in full or top-k form, scored by
the real teacher pool the way the loop scores a training batch. Checked against direct fp64 formulas on the
two models' own logits (no code of minillm/ or rollout/forward.py in the reference)."""
import math

import pytest
import ray
import torch

from launch.config import load_config, resolve_path
from rollout.types import RolloutBatch
from teacher.ray_pool import TeacherPool
from trainer.loop import score_for_update
from trainer.objective import objective_loss

TAU, BETA, SKEW, MU = 2.0, 0.3, 0.25, 0.6


def _log_mix(la, lb, w):
    return torch.logsumexp(torch.stack([la + math.log(w), lb + math.log1p(-w)]), 0)


def _kl(la, lb):
    return (la.exp() * (la - lb)).sum(-1)


def reference(name, ls, lt):
    """Per-token divergence between teacher log-probs lt and student log-probs ls (fp64, (n, V))."""
    if name == "forward_kl":
        return _kl(lt, ls)
    if name == "reverse_kl":
        return _kl(ls, lt)
    if name == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    if name == "skew_kl":
        return _kl(lt, _log_mix(lt, ls, SKEW))
    if name == "skew_rkl":
        return _kl(ls, _log_mix(ls, lt, SKEW))
    if name == "gkd":
        m = _log_mix(lt, ls, BETA)
        return BETA * _kl(lt, m) + (1 - BETA) * _kl(ls, m)
    if name == "akl":  # head: the teacher's most probable tokens until their mass reaches MU
        out = []
        for p, q in zip(lt.exp(), ls.exp()):
            order = torch.argsort(p, descending=True)
            mass, head = 0.0, set()
            for v in order.tolist():
                if mass >= MU:
                    break
                head.add(v)
                mass += float(p[v])
            in_head = torch.tensor([v in head for v in range(p.numel())])
            gap = (p - q).abs()
            g_head, g_tail = float(gap[in_head].sum()), float(gap[~in_head].sum())
            w = g_head / (g_head + g_tail)
            out.append(w * float((p * (p.log() - q.log())).sum()) + (1 - w) * float((q * (q.log() - p.log())).sum()))
        return torch.tensor(out, dtype=torch.float64)
    raise KeyError(name)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    ray.init(num_cpus=2, include_dashboard=False)
    cfg = load_config(None)
    pool = TeacherPool(resolve_path(cfg.model.teacher), num_replicas=1, num_cpus_per_replica=0.5)
    student = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.model.student), dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.model.teacher), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(5, 75, (n,), generator=g).tolist() for n in (3, 6, 2)]
    responses = [torch.randint(5, 75, (n,), generator=g).tolist() for n in (5, 2, 7)]  # right padding in the batch
    batch = RolloutBatch.from_lists(prompts, responses, pad_token_id=0)
    yield pool, student, teacher, batch, prompts, responses
    pool.shutdown()
    ray.shutdown()


def _direct_log_probs(model, prompts, responses):
    """(n_tokens, V) log-probs at every response position, one sequence at a time (no padding)."""
    rows = []
    for p, r in zip(prompts, responses):
        logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1]
        rows.append(torch.log_softmax(logits / TAU, -1))
    return torch.cat(rows)


@pytest.mark.parametrize("form", ["full", "topk"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tvd", "skew_kl", "skew_rkl", "gkd", "akl"])
def test_configured_divergence_reaches_the_loss(setup, name, form):
    pool, student, teacher, batch, prompts, responses = setup
    teacher_form = ["teacher.return_full=true"] if form == "full" else ["teacher.return_full=false", "teacher.topk=75"]
    cfg = load_config(None, [f"objective.name={name}", f"objective.temperature={TAU}", f"objective.beta={BETA}",
                             f"objective.skew_alpha={SKEW}", f"objective.akl_mu={MU}", *teacher_form])
    n_tokens = int(batch.response_lens.sum())
    with torch.no_grad():
        want = reference(name, _direct_log_probs(student, prompts, responses),
                         _direct_log_probs(teacher, prompts, responses)).mean()
    # the loop's scoring call for an update: to the driver (two learner ranks), or handed to the one learner
    for n_ranks in (2, 1):
        _, scores = score_for_update(pool, batch, cfg, n_ranks=n_ranks)
        if isinstance(scores, ray.ObjectRef):
            scores = ray.get(scores)
        with torch.no_grad():
            loss, _ = objective_loss(student, batch, scores, cfg.objective, global_tokens=n_tokens)
        # top-k with K = V is the full form up to the rest bucket's epsilon clamp (minillm/divergences.py)
        assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-6), n_ranks


@pytest.mark.parametrize("clip", ["0.05", "null"])
def test_minillm_flags_reach_the_loss(setup, clip):
    """Each MiniLLM flag of the config reaches minillm_loss as itself (values chosen so that a swap changes
    the loss), the batch's α gives the importance weights, and the teacher scores at τ = 1."""
    from minillm.policy_gradient import minillm_loss
    from rollout.forward import response_logits

    pool, student, teacher, _, prompts, responses = setup
    cfg = load_config(None, [f"objective.clip_eps={clip}", "objective.length_norm=false", "objective.gamma=0.9",
                             "objective.include_current=true", "objective.whiten=true", "objective.importance=sequence",
                             "rollout.mix_alpha=0.2"])
    batch = RolloutBatch.from_lists(prompts, responses, pad_token_id=0)
    g = torch.Generator().manual_seed(1)  # the rollout's log-probs, as from another (stale) policy
    batch.student_logprobs = (torch.randn(batch.response_mask().shape, generator=g) * 0.1 - 2.0) * batch.response_mask()
    batch.mix_alpha = 0.2
    _, scores = score_for_update(pool, batch, cfg, n_ranks=2)
    with torch.no_grad():
        direct = torch.cat([torch.log_softmax(teacher(torch.tensor([p + r])).logits[0, len(p) - 1:-1], -1)
                            .gather(-1, torch.tensor(r)[:, None])[:, 0] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(scores.token_logprobs[batch.response_mask()].double(), direct, rtol=0, atol=1e-5)

    n_tokens = int(batch.response_lens.sum())
    with torch.no_grad():
        loss, metrics = objective_loss(student, batch, scores, cfg.objective, global_tokens=n_tokens)
        want, want_metrics = minillm_loss(
            response_logits(student, batch), batch.response_tokens(), batch.response_mask(), batch.student_logprobs,
            scores.token_logprobs, teacher_logits=scores.full_logprobs, alpha=0.2,
            clip_eps=None if clip == "null" else 0.05, length_norm=False, gamma=0.9, include_current=True, whiten=True,
            importance="sequence", single_step=True, num_tokens=n_tokens)
    assert float(loss) == pytest.approx(float(want), rel=1e-9)
    assert metrics["reward"] == pytest.approx(float(want_metrics["reward"]), rel=1e-9)


def test_progress_bar_names_the_objectives_own_figures():
    from launch.config import load_config
    from trainer.loop import progress_fields
    gkd = progress_fields(load_config(None, ["objective.name=gkd", "objective.beta=0.3"]),
                          {"loss": 0.25, "divergence": 0.25}, 99.6)
    assert gkd == {"loss": "0.250", "jsd0.3": "0.250", "tok_s": "100"}  # JSD(β) is not shown as a reverse KL
    assert set(progress_fields(load_config(None, ["objective.name=akl"]), {"divergence": 1.0}, 1.0)) == {"loss", "akl", "tok_s"}
    mini = progress_fields(load_config(None), {"loss": 1.0, "reward": -2.0, "reverse_kl": 2.0}, 5.0)
    assert mini == {"loss": "1.000", "reward": "-2.000", "rkl": "2.000", "tok_s": "5"}
