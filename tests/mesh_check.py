"""Sharding checks on 8 fake CPU devices, each against one device (run by a test in a fresh
process: the device count must be set before jax starts):

- one RL train step on several (data, fsdp, tensor) meshes;
- generation and the multi-turn rollout with sharded params and a sharded KV cache;
- a rollout split into slices (as processes do) equals the whole;
- the simulator on a 2-device sub-mesh while the policy rolls out and trains on the other 6.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tests.rl_toy import toy_batch, toy_config  # noqa: E402
from zerosearch_jax import agent, models, sampling, search, sharding  # noqa: E402
from zerosearch_jax.agent.rollout import _decode, _extend, _init_cache  # noqa: E402
from zerosearch_jax.data import synthetic  # noqa: E402
from zerosearch_jax.models.hub import embedded_model_path  # noqa: E402
from zerosearch_jax.rl import train_step as ts  # noqa: E402
from zerosearch_jax.tokenizer import Tokenizer  # noqa: E402

P = jax.sharding.PartitionSpec
MESHES = [(2, 1, 4), (1, 2, 4), (2, 2, 2), (1, 8, 1)]  # (data, fsdp, tensor)


def train_step(config, params, batch, mesh):
    uc = ts.UpdateConfig(advantage_estimator="gae", micro_batch_size=4, num_minibatches=2,
                         remat=False)
    # SGD with clipping: linear in the gradient, so mesh reduction order stays at float epsilon
    # (Adam's first step is ~lr * sign(g): near-zero gradients could flip).
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
    copt = optax.sgd(0.5)
    fns = ts.make_train_fns(config, uc, opt, copt, mesh=mesh, rules=sharding.DEFAULT_RULES)
    state = fns.init_state(params, ts.init_critic(config, params, jax.random.key(0)))
    layout = fns.plan(batch["attention_mask"], seed=1)
    scored = fns.score(state.params, params, state.critic_params, batch, layout)
    state, metrics = fns.update(state, scored, layout)
    return state, {k: float(v) for k, v in metrics.items()}


def check_train_step():
    config = toy_config()
    params = models.init_params(config, 3)
    batch, _ = toy_batch(config, params, jax.random.key(0))
    ref_state, ref_metrics = train_step(config, params, batch, None)
    for shape in MESHES:
        mesh = sharding.make_mesh(shape)
        state, metrics = train_step(config, params, batch, mesh)
        # the parameters really are sharded, as the rules say
        spec = state.params["layer_0"]["mlp"]["gate_up"].sharding.spec
        assert spec == P("tensor", "fsdp"), spec
        for tree, ref in ((state.params, ref_state.params),
                          (state.critic_params, ref_state.critic_params)):
            for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, rtol=1e-4)
        print(f"train step, mesh {shape}: loss {metrics['loss']:.6f} == {ref_metrics['loss']:.6f}")


def check_generation():
    """Sharded params + KV cache give the single-device tokens; the cache stays sharded."""
    config = toy_config()
    params = models.init_params(config, 5)
    prompts = [[1, 4 + i % 3, 5, 3][: 2 + i % 3] for i in range(6)]
    kw = dict(max_new_tokens=8, rng=0, stop=sampling.StopConditions(eos_ids=(2,), pad_id=0))
    ref = sampling.generate(config, params, prompts, sampling.Temperature(1.0), **kw)
    for shape in [(2, 2, 2), (1, 8, 1)]:
        placement = sharding.Placement(sharding.make_mesh(shape))
        placed = placement.put(params, placement.param_shardings(config))
        out = sampling.generate(config, placed, prompts, sampling.Temperature(1.0),
                                placement=placement, **kw)
        np.testing.assert_array_equal(out["tokens"], ref["tokens"])
        np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-5)

        # The rollout's own cache steps: created sharded, kept sharded through a donated decode.
        B, S = 8, 32
        cache = _init_cache(config, B, S, np.dtype("float32"), placement)
        ids = jax.device_put(np.ones((B, 4), np.int32), placement.batch_sharding(2))
        logits, cache = _extend(config, placed, ids, np.ones((B, 4), bool), cache,
                                last_only=True, kv_length=S, placement=placement)
        _, cache = _decode(config, placed, cache, logits, jax.random.key(1),
                           sampler=sampling.Greedy(), max_new_tokens=4,
                           stop=sampling.StopConditions(), kv_length=S, placement=placement)
        want = placement.cache_shardings(config, cache)
        for leaf, sh in zip(jax.tree.leaves(cache), jax.tree.leaves(want), strict=True):
            assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.sharding, sh)
        print(f"generation, mesh {shape}: tokens equal, cache sharded {cache.k[0].sharding.spec}")


def tiny_policy(tokenizer):
    config = models.tiny_config("llama", vocab_size=len(tokenizer.hf), hidden_size=32,
                                intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=8, tie_word_embeddings=True, bos_token_id=1,
                                eos_token_ids=(2,), pad_token_id=2)
    return config, models.init_params(config, 0)


def check_rollout(config, params, tokenizer, world, engine):
    """The multi-turn rollout: sharded == unsharded, and slices (processes) == the whole."""
    questions = world.questions("train")[:4]
    rc = agent.RolloutConfig(samples_per_prompt=2, max_turns=1, max_new_tokens=12,
                             max_obs_tokens=64)
    # Fixed lengths (as the trainer sets them), so the slices' batches line up with the whole.
    P_len = sampling.bucket_length(max(len(agent.prompt_ids(tokenizer, q.question))
                                       for q in questions))
    kw = dict(rollout_config=rc, rng=7, batch_lengths=(P_len, 128))
    fields = ("tokens", "attention_mask", "loss_mask", "group")

    def same(a, b):
        for name in fields:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert a.loss_mask.sum() > 0 and len(set(map(tuple, a.tokens))) > 1

    def on(shape, devices=None):
        placement = sharding.Placement(sharding.make_mesh(shape, devices))
        return dict(placement=placement,
                    params=placement.put(params, placement.param_shardings(config)))

    def run(qs, params, **kw2):
        return agent.rollout(config, params, tokenizer, qs, engine, **kw, **kw2)[0]

    # Sharded weights and cache (fsdp sums run in another order): greedy, as sampling from a
    # random model's near-uniform distribution would flip on float noise.
    ref = run(questions, params, sampler=sampling.Greedy())
    same(run(questions, sampler=sampling.Greedy(), **on((2, 2, 2))), ref)

    # Two processes' slices vs the whole on their two devices (the same rows per device): with
    # per-row keys the sampled episodes are identical.
    whole = run(questions, sampler=sampling.TopP(0.95), **on((2, 1, 1), jax.devices()[:2]))
    halves = [run(questions[i:i + 2], sampler=sampling.TopP(0.95), first_example=i,
                  **on((1, 1, 1), jax.devices()[i // 2:i // 2 + 1])) for i in (0, 2)]
    for name in fields:
        np.testing.assert_array_equal(np.concatenate([getattr(h, name) for h in halves]),
                                      getattr(whole, name), err_msg=name)
    assert not np.array_equal(whole.tokens, ref.tokens)  # sampled, not greedy
    print("rollout: sharded (2, 2, 2) == one device; two slices == the whole")


def check_simulator_submesh(config, params, tokenizer, world):
    """The simulator (a model with the real vocabulary) on the last 2 devices, a policy's
    update (the toy model) on the other 6."""
    meshes = sharding.make_meshes((-1, 2, 1), simulator_devices=2)
    train_devices = set(meshes.train.mesh.devices.flat)
    sim_devices = set(meshes.simulator.mesh.devices.flat)
    assert len(train_devices) == 6 and sim_devices == set(jax.devices()[6:])
    assert meshes.rollout is meshes.train

    def simulator():
        return search.LLMSimulator(config, params, tokenizer, variant="prompted",
                                   max_new_tokens=16, prime_reply=True, seed=3)

    sim = simulator()
    sim.place(meshes.simulator)
    assert all(x.sharding.device_set <= sim_devices for x in jax.tree.leaves(sim.params))
    questions = world.questions("train")[:3]
    contexts = [search.QueryContext(q.question, q.golden_answers) for q in questions]
    queries = [q.question for q in questions]
    results = sim.search(queries, contexts=contexts)
    expected = simulator().search(queries, contexts=contexts)  # on one device
    assert [r.documents for r in results] == [r.documents for r in expected]
    assert all(r.ok and r.documents[0].startswith("Doc 1:") for r in results), results

    # The policy trains on the 6 training devices: 3 questions x 2 samples, one row a device.
    policy = toy_config()
    fns = ts.make_train_fns(policy, ts.UpdateConfig(micro_batch_size=2), optax.sgd(0.1),
                            mesh=meshes.train.mesh, rules=meshes.train.rules)
    state = fns.init_state(models.init_params(policy, 0))
    rows, _ = toy_batch(policy, state.params, jax.random.key(2), prompts_per_step=3, samples=2)
    layout = fns.plan(rows["attention_mask"])
    scored = fns.score(state.params, state.params, None, meshes.train.put_batch(rows, 6), layout)
    state, metrics = fns.update(state, scored, layout)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0
    assert all(x.sharding.device_set <= train_devices for x in jax.tree.leaves(state.params))
    print(f"simulator on {len(sim_devices)} devices ({len(results)} results), update on "
          f"{len(train_devices)}: loss {float(metrics['loss']):.6f}")


def main():
    assert len(jax.devices()) == 8, jax.devices()
    check_train_step()
    print("meshes agree")
    check_generation()
    tokenizer = Tokenizer.from_pretrained(embedded_model_path("smollm2-135m-instruct"))
    config, params = tiny_policy(tokenizer)
    world = synthetic.build_world(synthetic.WorldConfig(seed=0))
    engine = search.BM25SearchEngine.build(
        [search.Passage.from_contents(p["id"], p["contents"]) for p in world.passages], topk=3)
    check_rollout(config, params, tokenizer, world, engine)
    check_simulator_submesh(config, params, tokenizer, world)
    print("sharding checks passed")


if __name__ == "__main__":
    main()
