"""One RL train step on several meshes of 8 fake CPU devices vs one device (run by a test in a
fresh process: the device count must be set before jax starts)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tests.rl_toy import toy_batch, toy_config  # noqa: E402
from zerosearch_jax import models  # noqa: E402
from zerosearch_jax.rl import train_step as ts  # noqa: E402


def run(mesh_shape):
    config = toy_config()
    params = models.init_params(config, 3)
    batch, _ = toy_batch(config, params, jax.random.key(0))
    uc = ts.UpdateConfig(advantage_estimator="gae", micro_batch_size=4, num_minibatches=2,
                         remat=False)
    # SGD with clipping: linear in the gradient, so mesh reduction order stays at float epsilon
    # (Adam's first step is ~lr * sign(g): near-zero gradients could flip).
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
    copt = optax.sgd(0.5)
    mesh = None
    if mesh_shape is not None:
        devices = np.array(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
        mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    fns = ts.make_train_fns(config, uc, opt, copt, mesh=mesh)
    state = fns.init_state(params, ts.init_critic(config, params, jax.random.key(0)))
    scored = fns.score(state.params, params, state.critic_params, batch)
    state, metrics = fns.update(state, scored, jax.random.key(1))
    if mesh is not None:  # the parameters really are sharded
        spec = state.params["layer_0"]["mlp"]["gate_up"].sharding.spec
        assert spec == jax.sharding.PartitionSpec("tensor", "fsdp"), spec
    return jax.device_get(state.params), jax.device_get(state.critic_params), \
        {k: float(v) for k, v in metrics.items()}


def main():
    assert len(jax.devices()) == 8, jax.devices()
    ref_params, ref_critic, ref_metrics = run(None)
    for shape in [(2, 1, 4), (1, 2, 4), (2, 2, 2), (8, 1, 1)]:
        params, critic, metrics = run(shape)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(critic), jax.tree.leaves(ref_critic), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, rtol=1e-4)
        print(f"mesh {shape}: loss {metrics['loss']:.6f} == {ref_metrics['loss']:.6f}")
    print("meshes agree")


if __name__ == "__main__":
    main()
