"""The DeepSpeed learner as a Ray actor: one update changes the student, and the new weights reach
the rollout worker exactly (its log-probs equal the learner's after a sync)."""
import dataclasses

import pytest
import ray
import torch

from launch.config import load_config, resolve_path
from launch.placement import create_placement, release
from rollout.types import SamplingSettings
from trainer.loop import eval_objective, generate, score, train_on
from trainer.objective import select_scores
from trainer.roles import start_learners, start_rollout, start_teacher
from trainer.sync import sync_weights


@pytest.fixture(scope="module")
def roles(tmp_path_factory):
    ray.init(num_cpus=10, include_dashboard=False)
    cfg = load_config(None, ["rollout.num_cpus=1", "teacher.num_cpus=1", "trainer.num_cpus=1", "rollout.prompts_per_step=4",
                             "rollout.max_new_tokens=6", "trainer.warmup_steps=0"])
    placement = create_placement(cfg)
    learners = start_learners(cfg, placement["learner"])
    init_dir = tmp_path_factory.mktemp("init")
    ray.get([lr.save_hf.remote(str(init_dir)) for lr in learners])
    workers = start_rollout(cfg, placement["rollout"], str(init_dir))
    teacher = start_teacher(cfg, placement["teacher"])
    yield cfg, learners, workers, teacher
    teacher.shutdown()
    release(placement)
    ray.shutdown()


def _prompts():
    return [[1, 5, 42], [1, 66, 10, 16], [1, 7], [1, 20, 21, 22, 23]]


def test_update_changes_student_and_sync_reaches_rollout(roles):
    cfg, learners, workers, teacher = roles
    settings = SamplingSettings(max_new_tokens=6, eos_token_id=2, seed=3)
    batch = generate(workers, _prompts(), settings)
    # before any update the worker and the learner hold the same weights
    lp_learner = ray.get(learners[0].logprobs.remote(batch))
    torch.testing.assert_close(lp_learner, batch.student_logprobs, rtol=0, atol=1e-5)

    before = ray.get(learners[0].state_dict_cpu.remote())
    metrics = train_on(learners, batch, score(teacher, batch, cfg), None)
    after = ray.get(learners[0].state_dict_cpu.remote())
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged tensors: {set(before) - set(changed)}"

    # the worker is stale until the sync ...
    lp_new = ray.get(learners[0].logprobs.remote(batch))
    lp_worker_stale = ray.get(workers[0].logprobs.remote(batch))
    assert (lp_new - lp_worker_stale).abs().max() > 1e-4
    # ... and exact after it
    n = sync_weights(learners, workers, bucket_mb=1)
    assert n == len(after)
    lp_worker = ray.get(workers[0].logprobs.remote(batch))
    torch.testing.assert_close(lp_worker, lp_new, rtol=0, atol=1e-6)
    assert ray.get(workers[0].weights_version.remote()) == 1


def test_rollout_logprobs_equal_direct_forward(roles):
    """Tokens and log-probs from the Ray rollout actor equal an independent forward of the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, learners, workers, _ = roles
    batch = generate(workers, _prompts(), SamplingSettings(max_new_tokens=5, eos_token_id=2, seed=11, n=2))
    assert len(batch) == 8
    sd = ray.get(learners[0].state_dict_cpu.remote())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_path(cfg.model.student)))
    model.load_state_dict(sd)
    model.eval()
    for i in range(len(batch)):
        p, r = int(batch.prompt_lens[i]), int(batch.response_lens[i])
        seq = batch.sequences[i, :p + r][None]
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].double(), -1)
        expect = logp[p - 1:p + r - 1].gather(-1, seq[0, p:p + r, None])[:, 0]
        torch.testing.assert_close(batch.student_logprobs[i, :r].double(), expect, rtol=0, atol=2e-5)
        assert (batch.student_logprobs[i, r:] == 0).all()
    # prompts come back in order, each repeated n times
    for k, p in enumerate(_prompts()):
        for j in range(2):
            row = 2 * k + j
            assert batch.sequences[row, :len(p)].tolist() == p and int(batch.prompt_lens[row]) == len(p)


def test_two_workers_return_rows_in_prompt_order(roles):
    cfg, *_ = roles
    cfg2 = load_config(None, ["rollout.num_workers=2", "rollout.num_cpus=1"])
    placement = create_placement(dataclasses.replace(cfg2, teacher=dataclasses.replace(cfg2.teacher, backend="http", url="x",
                                                                                        return_full=False)))
    try:
        workers = start_rollout(cfg2, placement["rollout"], resolve_path(cfg2.model.student))
        prompts = _prompts() + [[1, 30]]
        batch = generate(workers, prompts, SamplingSettings(max_new_tokens=3, eos_token_id=2, seed=5, n=3))
        assert len(batch) == 15
        for k, p in enumerate(prompts):
            for j in range(3):
                assert batch.sequences[3 * k + j, :len(p)].tolist() == p
        # each shard sampled on its own worker with its own seed; the log-probs are still exact
        direct = ray.get(workers[0].logprobs.remote(batch))
        torch.testing.assert_close(direct, batch.student_logprobs, rtol=0, atol=1e-6)
    finally:
        for w in workers:
            ray.kill(w)
        release(placement)


def test_metrics_over_micro_batches_equal_the_whole_batch_loss(roles):
    """Split into many token-budget micro-batches, the reported MiniLLM loss terms equal the loss of
    the whole batch computed directly (minillm_loss on the same weights, before the update); with two
    PPO epochs the reported grad norm is the first (on-policy) update's, before clipping."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from minillm.policy_gradient import minillm_loss
    from rollout.forward import response_logits
    from trainer.objective import teacher_kwargs

    cfg, _, workers, teacher = roles
    small = load_config(None, ["trainer.micro_batch_tokens=12", "trainer.warmup_steps=0", "trainer.num_cpus=1",
                               "objective.ppo_epochs=2",
                               "rollout.num_cpus=1", "teacher.backend=http", "teacher.url=http://x", "teacher.return_full=false", "teacher.topk=8"])
    placement = create_placement(small)
    try:
        learner = start_learners(small, placement["learner"])
        batch = generate(workers, _prompts(), SamplingSettings(max_new_tokens=6, eos_token_id=2, seed=21, n=2))
        scores = score(teacher, batch, cfg)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_path(cfg.model.student)))
        model.load_state_dict(ray.get(learner[0].state_dict_cpu.remote()))
        loss, ref = minillm_loss(response_logits(model, batch), batch.response_tokens(), batch.response_mask(),
                                 batch.student_logprobs, scores.token_logprobs, **teacher_kwargs(scores, "cpu"))
        loss.backward()
        ref_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        metrics = train_on(learner, batch, scores, None)
        for key in ("loss", "pg_loss", "single_step_loss", "reward", "reverse_kl"):
            assert metrics[key] == pytest.approx(float(ref[key]), rel=1e-4, abs=1e-5), key
        assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    finally:
        ray.kill(learner[0])
        release(placement)


def test_bf16_learner_starts_with_a_fresh_adam_state(roles):
    """bf16 at ZeRO 0: DeepSpeed's wrapper steps the optimizer once on zero gradients while it initialises; the
    learner must undo that, so the first update is Adam's step 1, as in fp32 runs (and as TRL's)."""
    cfg, _, workers, teacher = roles
    base = load_config(None, ["trainer.zero_stage=0", "trainer.warmup_steps=0", "trainer.num_cpus=1", "rollout.num_cpus=1",
                              "teacher.backend=http", "teacher.url=http://x", "teacher.return_full=false", "teacher.topk=8"])
    # the config reserves bf16 for GPU runs; DeepSpeed's CPU accelerator takes the same bf16 ZeRO-0 path
    bf16 = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, bf16=True),
                               model=dataclasses.replace(base.model, dtype="bfloat16"))
    placement = create_placement(bf16)
    learner = []
    try:
        learner = start_learners(bf16, placement["learner"])
        assert ray.get(learner[0].optimizer_steps.remote()) == 0
        batch = generate(workers, _prompts(), SamplingSettings(max_new_tokens=4, eos_token_id=2, seed=2))
        train_on(learner, batch, score(teacher, batch, cfg), None)
        assert ray.get(learner[0].optimizer_steps.remote()) == 1
    finally:
        for lr in learner:
            ray.kill(lr)
        release(placement)


def _start(overrides):
    cfg = load_config(None, ["trainer.num_cpus=1", "rollout.num_cpus=1", "teacher.backend=http", "teacher.url=http://x",
                             "teacher.return_full=false", "teacher.topk=8", *overrides])
    placement = create_placement(cfg)
    return start_learners(cfg, placement["learner"]), placement


@pytest.mark.slow
def test_learner_options_leave_the_first_update_unchanged(roles):
    """Gradient checkpointing, ZeRO-2 and ZeRO-2 with the optimizer offloaded to CPU (DeepSpeed's CPU Adam) are
    memory options: one update on the same batch must give the weights of the plain ZeRO-0 fp32 learner."""
    cfg, _, workers, teacher = roles
    batch = generate(workers, _prompts(), SamplingSettings(max_new_tokens=6, eos_token_id=2, seed=5))
    scores = score(teacher, batch, cfg)
    common = ["trainer.lr=1e-3", "trainer.weight_decay=0.1", "trainer.warmup_steps=0"]
    variants = {"reference": [], "no_decay": ["trainer.weight_decay=0"],
                "gradient_checkpointing": ["trainer.gradient_checkpointing=true"],
                "zero2": ["trainer.zero_stage=2"], "zero2_cpu_offload": ["trainer.zero_stage=2", "trainer.cpu_offload=true"]}
    weights, start = {}, None
    for name, extra in variants.items():
        learner, placement = _start(common + extra)
        try:
            if name == "gradient_checkpointing":  # the option reached the model
                assert ray.get(learner[0].__ray_call__.remote(lambda self: self.model.is_gradient_checkpointing))
            if start is None:
                start = ray.get(learner[0].state_dict_cpu.remote())
            train_on(learner, batch, scores, None)
            weights[name] = ray.get(learner[0].state_dict_cpu.remote())
        finally:
            ray.kill(learner[0])
            release(placement)
    ref = weights["reference"]
    moved = max(float((ref[k] - start[k]).abs().max()) for k in ref)
    assert moved > 5e-4  # Adam's first step moves weights by about lr
    # AdamW's decoupled decay, as HF Trainer groups it: weight matrices and embeddings shrink by lr * wd * w on top
    # of the Adam step, norm weights (1-D here) do not
    for k in ref:
        decayed = -1e-3 * 0.1 * start[k] if start[k].dim() >= 2 else torch.zeros_like(start[k])
        torch.testing.assert_close(ref[k] - weights["no_decay"][k], decayed, rtol=1e-3, atol=1e-8, msg=k)
    for name, w in weights.items():
        if name == "no_decay":
            continue
        for k in ref:
            torch.testing.assert_close(w[k], ref[k], rtol=0, atol=2e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("schedule, warmup_key", [("constant", "warmup_steps=2"), ("linear", "warmup_steps=2"),
                                                  ("cosine", "warmup_steps=2"),
                                                  ("linear", "warmup_ratio=0.3")])  # 0.3 x 5 updates, rounded up: 2
def test_learning_rate_follows_the_schedule_with_warmup(roles, schedule, warmup_key):
    """The rate each update uses, against the closed forms: linear warm-up over `warmup_steps` updates from 0,
    then constant, linear decay to 0, or half a cosine to 0, at the end of `steps` × `ppo_epochs` updates."""
    import math

    cfg, _, workers, teacher = roles
    lr, steps, warmup = 1e-3, 5, 2
    batch = generate(workers, _prompts(), SamplingSettings(max_new_tokens=3, eos_token_id=2, seed=9))
    scores = score(teacher, batch, cfg)
    learner, placement = _start([f"trainer.lr={lr}", f"trainer.steps={steps}", f"trainer.{warmup_key}",
                                 f"trainer.lr_schedule={schedule}",
                                 *(["trainer.warmup_steps=0"] if "ratio" in warmup_key else [])])
    try:
        used = [train_on(learner, batch, scores, None)["lr"] for _ in range(steps)]
    finally:
        ray.kill(learner[0])
        release(placement)

    def expected(s):
        if s < warmup:
            return lr * s / warmup
        progress = (s - warmup) / (steps - warmup)
        return lr * {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[schedule]

    assert used == pytest.approx([expected(s) for s in range(steps)], rel=1e-9, abs=1e-15)


def test_student_from_config_is_the_seeded_random_init(roles):
    """model.student_init=from_config: the student's architecture with fresh weights, drawn from trainer.seed
    (the same as transformers' own init under that seed), not the folder's trained weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, *_ = roles
    learner, placement = _start(["model.student_init=from_config", "trainer.seed=7"])
    try:
        got = ray.get(learner[0].state_dict_cpu.remote())
    finally:
        ray.kill(learner[0])
        release(placement)
    torch.manual_seed(7)
    want = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_path(cfg.model.student))).state_dict()
    trained = load_file(resolve_path("builtin:tiny-student/model.safetensors"))
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(got[k], trained[k]) for k in trained if k in got)


def test_a_rank_without_rows_still_takes_part_in_the_update(roles):
    """More learner ranks than rows (here 2 ranks, 1 row of rollout and 1 pretraining window): the rank without
    rows must still run its forwards and collectives, or the other waits forever. The update equals one rank's
    on the same row."""
    import threading

    cfg, _, workers, teacher = roles
    batch = generate(workers, _prompts()[:1], SamplingSettings(max_new_tokens=5, eos_token_id=2, seed=4))
    scores = score(teacher, batch, cfg)
    pretrain = batch.select([0])  # any text serves as L_PT data here
    common = ["trainer.lr=1e-3", "trainer.warmup_steps=0", "objective.pt_weight=0.5",
              "data.pretrain=builtin:corpus/pretrain.jsonl"]
    weights = {}
    for name, extra in {"one_rank": [], "two_ranks": ["trainer.num_ranks=2", "trainer.zero_stage=1"]}.items():
        learner, placement = _start(common + extra)
        try:
            done = {}
            thread = threading.Thread(target=lambda: done.update(m=train_on(learner, batch, scores, pretrain)), daemon=True)
            thread.start()
            thread.join(timeout=180)
            assert "m" in done, f"{name}: the update did not finish (a rank left out of the step)"
            weights[name] = ray.get(learner[0].state_dict_cpu.remote())
        finally:
            for lr in learner:
                ray.kill(lr)
            release(placement)
    for k, ref in weights["one_rank"].items():
        torch.testing.assert_close(weights["two_ranks"][k], ref, rtol=0, atol=2e-6, msg=k)


def test_resume_applies_the_new_learning_rate_and_weight_decay(roles, tmp_path):
    """A run resumed with another trainer.lr / trainer.weight_decay uses them from its first update (the saved
    optimizer and scheduler carried the old ones), at the schedule's current step; Adam's state is the saved one."""
    cfg, _, workers, teacher = roles
    batch = generate(workers, _prompts(), SamplingSettings(max_new_tokens=4, eos_token_id=2, seed=8))
    scores = score(teacher, batch, cfg)
    shape = ["trainer.steps=6", "trainer.warmup_steps=1", "trainer.lr_schedule=linear"]
    learner, placement = _start(shape + ["trainer.lr=1e-3", "trainer.weight_decay=0.0"])
    try:
        used = [train_on(learner, batch, scores, None)["lr"] for _ in range(2)]
        ray.get(learner[0].save_checkpoint.remote(str(tmp_path)))
    finally:
        ray.kill(learner[0])
        release(placement)
    assert used == pytest.approx([0.0, 1e-3])  # warm-up from 0, then the linear decay's start
    learner, placement = _start(shape + ["trainer.lr=5e-3", "trainer.weight_decay=0.25"])
    try:
        ray.get(learner[0].load_checkpoint.remote(str(tmp_path)))
        assert ray.get(learner[0].optimizer_steps.remote()) == 2
        lr = train_on(learner, batch, scores, None)["lr"]
        # read from the optimizer DeepSpeed steps (its wrapper's groups), and the rate it used from the group itself
        decay, group_lr = ray.get(learner[0].__ray_call__.remote(
            lambda self: ({g["decays"]: g["weight_decay"] for g in self.engine.optimizer.param_groups},
                          {g["lr"] for g in self.engine.optimizer.param_groups})))
    finally:
        ray.kill(learner[0])
        release(placement)
    assert lr == pytest.approx(5e-3 * (1 - (2 - 1) / (6 - 1)))  # linear decay at update 2 of 6, warm-up 1
    assert decay == {True: 0.25, False: 0.0}  # the new rate; biases and norm weights never decay
    assert sorted(group_lr) == pytest.approx([5e-3 * (1 - (3 - 1) / (6 - 1))])  # the scheduler moved on to update 3


def test_held_out_objective_loss_is_the_divergence_under_the_learners_weights(roles):
    """eval_objective (the GKD eval loss) against a direct computation: the student's log-probs from an HF forward
    of the learner's weights, row by row, and JSD(beta) from its closed form over the full vocabulary, as the mean
    over response tokens. Small micro-batches: several forwards. No update happens."""
    from transformers import AutoModelForCausalLM

    cfg, _, workers, teacher = roles
    batch = generate(workers, _prompts(), SamplingSettings(max_new_tokens=6, eos_token_id=2, seed=4, n=2))
    scores = score(teacher, batch, cfg)
    beta = 0.3
    learner, placement = _start(["objective.name=gkd", f"objective.beta={beta}", "trainer.micro_batch_tokens=24"])
    try:
        weights = ray.get(learner[0].state_dict_cpu.remote())
        got = eval_objective(learner, batch, scores)
        assert all(torch.equal(v, w) for v, w in zip(weights.values(), ray.get(learner[0].state_dict_cpu.remote()).values()))
    finally:
        ray.kill(learner[0])
        release(placement)

    model = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.model.student)).eval()
    model.load_state_dict(weights)
    per_token = []
    with torch.no_grad():
        for i in range(len(batch)):
            P, R = int(batch.prompt_lens[i]), int(batch.response_lens[i])
            logits = model(batch.sequences[i, :P + R][None]).logits[0, P - 1:P + R - 1].double()
            log_q, log_p = torch.log_softmax(logits, -1), scores.full_logprobs[i, :R].double()
            q, p = log_q.exp(), log_p.exp()
            log_m = torch.log(beta * p + (1 - beta) * q)
            per_token.append(beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1))
    expected = float(torch.cat(per_token).mean())
    assert set(got) == {"loss", "divergence"}
    assert got["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)

    # two ZeRO-3 ranks: rows sharded and merged by token count; with one row, the rank without rows runs its
    # dummy forwards (ZeRO-3 gathers are collective) and the figure is that row's own
    one = batch.select([0])
    learner, placement = _start(["objective.name=gkd", f"objective.beta={beta}", "trainer.micro_batch_tokens=24",
                                 "trainer.num_ranks=2", "trainer.zero_stage=3"])
    try:
        sharded = eval_objective(learner, batch, scores)
        alone = eval_objective(learner, one, select_scores(scores, [0], one.max_response_len))
    finally:
        for lr in learner:
            ray.kill(lr)
        release(placement)
    assert sharded["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert alone["loss"] == pytest.approx(float(per_token[0].mean()), rel=1e-4, abs=1e-6)
