"""The full loop on a two-node local Ray cluster: roles placed by placement groups on both nodes,
DeepSpeed with 2 ranks (gloo) on ZeRO 1 and 3, and GKD's λ choosing the data path batch by batch."""
import json
import math

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from launch.config import load_config, resolve_path
from minillm.gkd import OnPolicyMixer
from trainer.loop import Hooks, train

from pretrain_reference import first_step_pretrain_losses  # tests/

COMMON = ["trainer.num_ranks=2", "trainer.num_cpus=1", "rollout.num_cpus=1", "teacher.num_cpus=1",
          "cluster.spread_roles=true", "rollout.prompts_per_step=6", "rollout.max_new_tokens=6",
          "data.eval_prompts=null", "trainer.warmup_steps=0", "teacher.return_full=true"]


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _dataset_responses(tokenizer):
    """prompt token ids -> set of tokenised dataset responses (prompts may repeat)."""
    out = {}
    with open(resolve_path("builtin:corpus/prompts_train.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            ids = tuple(tokenizer(row["prompt"])["input_ids"])
            resp = tuple(tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            out.setdefault(ids, set()).add(resp)
    return out


def _run(cfg, record):
    placements, nodes, started = {}, {}, {}

    def on_start(roles):
        started["roles"] = roles
        for role, p in roles.placement.items():
            placements[role] = list(placement_group_table(p.group)["bundles_to_node_id"].values())
        nodes["learners"] = [ray.get(lr.ready.remote())["node_id"] for lr in roles.learners]
        nodes["sync"] = roles.sync.path

    def on_batch(step, batch):
        record.append((step, batch))
        if batch.student_logprobs is not None:
            # the rollout sampled with the weights synced after the previous update: the learner's
            # (sharded under ZeRO-3: every rank joins the forward) must give the same log-probs
            learners = started["roles"].learners
            learner_lp = ray.get([lr.logprobs.remote(batch) for lr in learners])[0]
            torch.testing.assert_close(learner_lp, batch.student_logprobs, rtol=0, atol=1e-5)

    summary = train(cfg, Hooks(progress=False, on_start=on_start, on_batch=on_batch))
    return summary, placements, nodes


def _rows(batch):
    for i in range(len(batch)):
        p, r = int(batch.prompt_lens[i]), int(batch.response_lens[i])
        yield tuple(batch.sequences[i, :p].tolist()), tuple(batch.sequences[i, p:p + r].tolist())


@pytest.mark.slow
# (3, 1.0) sends weights by broadcast (gloo) from learner rank 0 to the worker on the other node;
# on_batch checks every step that the worker's log-probs equal the sharded learner's
@pytest.mark.parametrize("zero_stage, lam, sync", [(1, 0.0, "object_store"), (3, 1.0, "broadcast"), (3, 0.5, "object_store")])
def test_gkd_two_nodes_two_ranks(two_nodes, tmp_path, zero_stage, lam, sync):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = 4
    cfg = load_config(None, COMMON + [f"trainer.zero_stage={zero_stage}", "objective.name=gkd", f"objective.lam={lam}",
                                      f"trainer.steps={steps}", f"output_dir={tmp_path}", "trainer.lr=1e-2",
                                      f"rollout.weight_sync={sync}"])
    record = []
    summary, placements, nodes = _run(cfg, record)

    # placement: learner ranks on different nodes, each actor on its bundle's node, all roles on the two nodes
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2
    assert len(set(placements["learner"])) == 2
    assert nodes["learners"] == placements["learner"]
    assert set(sum(placements.values(), [])) == node_ids
    assert nodes["sync"] == sync

    # the data path of every batch follows the seeded λ draw
    mixer = OnPolicyMixer(lam, seed=cfg.trainer.seed)
    expected = [mixer.next_source() for _ in range(steps)]
    assert [b.source for _, b in record] == expected
    if lam == 0.5:
        assert {"student", "dataset"} == set(expected), "seed gives both paths in 4 steps"
    tok = AutoTokenizer.from_pretrained(resolve_path("builtin:tokenizer"))
    dataset = _dataset_responses(tok)
    for _, batch in record:
        if batch.source == "dataset":
            assert batch.student_logprobs is None
            for prompt, resp in _rows(batch):
                assert resp in dataset[prompt]
        else:
            assert batch.source == "student" and batch.student_logprobs is not None
            assert any(resp not in dataset.get(prompt, set()) for prompt, resp in _rows(batch))

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == steps and all(math.isfinite(r["loss/loss"]) for r in rows)

    # the exported student (consolidated from the 2-rank checkpoint) moved away from its start
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    init = AutoModelForCausalLM.from_pretrained(tmp_path / "rollout_init")
    diffs = [float((a - b).abs().max()) for a, b in zip(final.state_dict().values(), init.state_dict().values())]
    assert min(diffs) > 0, "every tensor changed"


@pytest.mark.slow
def test_minillm_zero3_uneven_micro_batches_with_pretraining_loss(two_nodes, tmp_path):
    """ZeRO-3 forwards are collective: ranks with fewer micro-batches (and L_PT slots) must still keep step. The
    pretraining windows and the teacher's scores of them (objective.pt_kd_ratio) are sharded over the two ranks:
    the first step's figures still equal the direct computation on the whole batch."""
    cfg = load_config(None, COMMON + ["trainer.zero_stage=3", "trainer.steps=3", f"output_dir={tmp_path}",
                                      "trainer.micro_batch_tokens=20", "rollout.prompts_per_step=5",
                                      "objective.pt_weight=0.5", "data.pretrain=builtin:corpus/pretrain.jsonl",
                                      "objective.pt_kd_ratio=0.5", "data.pretrain_max_len=16"])
    record = []
    _run(cfg, record)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert math.isfinite(r["loss/loss"]) and math.isfinite(r["loss/pt_loss"]) and r["train/grad_norm"] > 0
    nll, kl = first_step_pretrain_losses(cfg)
    assert rows[0]["loss/pt_lm_loss"] == pytest.approx(nll, rel=1e-4)
    assert rows[0]["loss/pt_kd_loss"] == pytest.approx(kl, rel=1e-4)
