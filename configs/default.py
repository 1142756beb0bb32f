"""The embedded default: ZeroSearch on the synthetic world with SmolLM2-135M-Instruct.

Policy and simulator are the embedded SmolLM2-135M-Instruct (no hub needed); training questions
come from the synthetic knowledge world, whose answers no model knows without searching;
validation uses a real engine (BM25 over the world's passages). Three stages: the policy's
format warm-up, simulator tuning, then GRPO; sized for about 20 minutes on a 2-core CPU
(docs/training.md has the measured run):

    python -m zerosearch_jax.train --config=configs/default.py --workdir=runs/default
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import simulator_sft  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # every random choice (data order, sampling, coin flips) derives from it.
    c.total_steps = 6  # RL steps (upstream: 203).

    # -- models -------------------------------------------------------------------------------
    c.policy = "smollm2-135m-instruct"  # embedded name, HF dir, .gguf file or hub id.
    c.tokenizer = ""  # defaults to the policy's.
    c.param_dtype = "float32"  # master weights and Adam moments: float32 | bfloat16.
    c.compute_dtype = "bfloat16"  # matmul inputs (float32 accumulation) and rollout weights.
    c.remat = False  # rematerialize blocks in the backward pass: less activation memory, ~25%
    # more update time; the default's 16 x ~700-token batches fit in a few GB without it.

    # -- data ---------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.train = "synthetic:train"  # synthetic:<split> | file.jsonl | file.parquet | hf:id:config
    c.data.validation = "synthetic:validation"
    c.data.synthetic_seed = 0  # seed of the synthetic world.
    c.data.validation_size = 16  # questions used for validation (fixed sample).
    c.data.on_error = "skip"  # malformed rows: skip (logged) or raise.

    # -- rollout --------------------------------------------------------------------------------
    c.prompts_per_step = 4  # questions per RL step (upstream: 64).
    c.rollout = ml_collections.ConfigDict()
    c.rollout.samples_per_prompt = 4  # rollouts per question (upstream: 5).
    c.rollout.max_turns = 2  # searches before the final answer turn.
    c.rollout.max_new_tokens = 48  # per policy turn (upstream: 500).
    c.rollout.max_obs_tokens = 128  # per inserted observation (upstream: 500).
    c.rollout.max_prompt_tokens = 512  # the world's questions need ~170 (chat template included).
    c.rollout.max_context_tokens = 4096
    # auto: each rollout one jitted program (policy turns, parsing, the simulator, inserted
    # documents) when the simulator is the in-process llm with the policy's tokenizer, else the
    # host loop | in_graph | host.
    c.rollout.engine = "auto"
    c.rollout.temperature = 1.0
    c.rollout.top_p = 0.95

    # -- format warm-up (the stage before RL) --------------------------------------------------
    # A 135M policy cannot follow the template unaided, so RL would see only zero rewards:
    # behaviour cloning on demonstration episodes (search the question, read real BM25
    # documents, answer; agent/warmup.py) first, cached in <workdir>/warmup. The paper's
    # configs set steps = 0 (their 3B/7B policies need none).
    c.warmup = ml_collections.ConfigDict()
    c.warmup.steps = 10  # behaviour-cloning steps (0: no warm-up); the loss is ~0.06 by step 9.
    c.warmup.num_questions = 48  # training questions to demonstrate (those whose visible
    # documents lack a gold answer are dropped).
    c.warmup.batch_size = 4
    c.warmup.lr = 5e-5

    # -- simulated search engine used for training --------------------------------------------
    c.simulator = ml_collections.ConfigDict()
    c.simulator.kind = "llm"  # llm (in process) | server (OpenAI-compatible) | bm25 | searchr1
    c.simulator.model = "smollm2-135m-instruct"  # llm: the simulator (the base, if tuned).
    # Tune simulator.model with the simulator-SFT pipeline before RL (after the warm-up, whose
    # policy does the collecting: BM25 results on the world, labelled, fine-tuned), cached in
    # <workdir>/simulator_sft; its settings are configs/simulator_sft.py's, sized down here.
    c.simulator.tune = True
    c.simulator.sft = simulator_sft.get_config()
    c.simulator.sft.seed = c.get_ref("seed")
    c.simulator.sft.data.synthetic_seed = c.data.get_ref("synthetic_seed")  # the same world
    c.simulator.sft.data.num_questions = 96
    c.simulator.sft.finetune.steps = 32  # about half a pass over the ~250 balanced examples
    c.simulator.sft.finetune.remat = False
    c.simulator.sft.report.num_queries = 8
    c.simulator.url = ""  # server / searchr1: endpoint.
    c.simulator.variant = "finetuned"  # finetuned (SFT prompt) | prompted (one-shot demo).
    c.simulator.prime_reply = False  # start the reply with "Doc 1:" (small prompted models).
    c.simulator.max_new_tokens = 128  # upstream: 600. The policy sees at most
    # rollout.max_obs_tokens = 128 of a page (documents are cut from the end), so more is waste.
    c.simulator.temperature = 0.8
    c.simulator.topk = 5

    # -- curriculum -----------------------------------------------------------------------------
    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.schedule = "exponential"  # exponential | linear | constant
    c.curriculum.start = 0.0  # p_noise at the first step.
    c.curriculum.end = 0.5  # p_noise at the last step.
    c.curriculum.base = 4.0

    # -- algorithm ------------------------------------------------------------------------------
    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.estimator = "grpo"  # reinforce | grpo | gae (PPO) | reinforce_pp
    c.algorithm.ppo_epochs = 1
    c.algorithm.num_minibatches = 1
    c.algorithm.micro_batch_size = 2  # rows per forward/backward (packed rows when packing).
    # Scoring and update rows of pack_length tokens, each holding several episodes (attention
    # within each, a GRPO group's prompt once per row): they pay for real tokens, not for
    # padding to the longest episode. 0: one episode a row. At least the longest possible
    # episode (rollout.max_prompt_tokens + the response's turns and observations, 912 here).
    c.algorithm.pack_length = 1024
    c.algorithm.clip_low = 0.2
    c.algorithm.clip_high = 0.2
    c.algorithm.entropy_coef = 0.001
    c.algorithm.kl_coef = 0.001
    c.algorithm.kl_estimator = "low_var_kl"  # k1 | abs | mse | low_var_kl
    c.algorithm.use_kl_loss = True
    c.algorithm.kl_in_reward = False  # PPO upstream: KL in the reward instead.
    c.algorithm.upstream_kl_sign = False  # True reproduces upstream's subtracted KL (a bug).
    c.algorithm.gamma = 1.0
    c.algorithm.lam = 1.0
    c.algorithm.value_clip = 0.5

    # -- optimizer ------------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-6
    c.optim.warmup_ratio = 0.0  # upstream: 0.95 (REINFORCE/GRPO), 0.285 (PPO actor).
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.critic_lr = 1e-5
    c.optim.critic_warmup_ratio = 0.0

    # -- validation, logging, checkpoints --------------------------------------------------------
    c.validation = ml_collections.ConfigDict()
    c.validation.every = 3  # steps; also before the first and after the last step.
    c.validation.engine = "bm25"  # bm25 (over the world / a corpus) | searchr1 | serpapi
    c.validation.corpus = ""  # bm25: "" = the synthetic world's passages, "wiki", or a jsonl.
    c.validation.url = ""
    c.validation.topk = 3
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 3
    c.checkpoint.keep = 2
    c.export_hf = True  # write the final policy as a HF directory (<workdir>/hf_policy).
    c.max_nonfinite_steps = 3  # consecutive skipped updates before the run stops.

    # -- mesh ------------------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices.
    # (logical axis, mesh axes) pairs placing weights, KV caches and batches (sharding.py).
    c.mesh.axis_rules = (
        ("batch", ("data", "fsdp")),  # rollout and update batches: data parallel.
        ("vocab", "tensor"),
        ("embed", "fsdp"),  # weights fully sharded over fsdp (gathered layer by layer).
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),  # also the KV cache's heads.
        ("head_dim", None),
    )
    c.mesh.simulator_devices = 0  # >0: the llm simulator gets the last n devices of each host.
    c.mesh.simulator_shape = (-1, 1, 1)  # (data, fsdp, tensor) of that simulator sub-mesh.
    return c
