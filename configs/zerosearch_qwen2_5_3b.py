"""ZeroSearch, Qwen-2.5-3B base policy, REINFORCE (the paper's main setting; docs/method.md §7).

Needs: the training data (`huggingface-cli download --repo-type dataset sunhaonlp/ZeroSearch_dataset
--local-dir ZeroSearch_dataset`), the 14B simulator served with an OpenAI-compatible API
(`python -m sglang.launch_server --model-path sunhaonlp/SearchSimulation_14B --port 6001`), and a
retriever for validation (`zerosearch-retrieval-server --corpus wiki --port 8000`, or a
Search-R1 wiki-18 server).
"""

from configs import default


def get_config(policy="Qwen/Qwen2.5-3B", noise_start=0.0, noise_end=0.25,
               estimator="reinforce"):
    c = default.get_config()
    c.total_steps = 203
    c.policy = policy
    c.remat = True
    c.param_dtype = "float32"
    c.compute_dtype = "bfloat16"
    # NQ + HotpotQA training questions in the upstream parquet format, read unchanged.
    c.data.train = "ZeroSearch_dataset/train.parquet"
    c.data.validation = "ZeroSearch_dataset/test.parquet"
    c.data.validation_size = 512
    c.prompts_per_step = 64
    c.rollout.samples_per_prompt = 5
    c.rollout.max_turns = 2
    c.rollout.max_new_tokens = 500
    c.rollout.max_obs_tokens = 500
    c.rollout.max_prompt_tokens = 2048
    c.rollout.max_context_tokens = 4096
    c.rollout.temperature = 1.0
    c.rollout.top_p = 0.95
    # The released fine-tuned 14B simulator behind SGLang (upstream's set-up).
    c.simulator.kind = "server"
    c.simulator.tune = False  # the released simulator is already tuned (default.py tunes one)
    c.warmup.steps = 0  # RL from the base model, as the paper (default.py warms up its 135M)
    c.simulator.url = "http://127.0.0.1:6001"
    c.simulator.model = "sunhaonlp/SearchSimulation_14B"
    c.simulator.variant = "finetuned"
    c.simulator.prime_reply = False
    c.simulator.block_answer = False  # upstream's simulator (a server cannot ban sequences)
    c.simulator.max_new_tokens = 600
    c.simulator.temperature = 0.8
    c.curriculum.schedule = "exponential"
    c.curriculum.start = noise_start
    c.curriculum.end = noise_end
    c.curriculum.base = 4.0
    c.algorithm.estimator = estimator
    c.algorithm.micro_batch_size = 8
    # Unpacked rows: packing 4.5k-token episodes wants a segment-aware flash kernel on TPU (a
    # dense [L, L] mask per row is what the CPU default uses).
    c.algorithm.pack_length = 0
    c.algorithm.entropy_coef = 0.001
    c.algorithm.kl_coef = 0.001
    # REINFORCE / GRPO: a KL loss term with the low-variance estimator (veRL `use_kl_loss`,
    # `low_var_kl`). PPO (veRL `kl_penalty: kl`) and REINFORCE++ put -kl_coef * k1 into every
    # token's reward before the return instead, and have no KL loss.
    kl_in_reward = estimator in ("gae", "reinforce_pp")
    c.algorithm.kl_estimator = "k1" if kl_in_reward else "low_var_kl"
    c.algorithm.use_kl_loss = not kl_in_reward
    c.algorithm.kl_in_reward = kl_in_reward
    c.optim.lr = 1e-6
    c.optim.warmup_ratio = 0.285 if estimator == "gae" else 0.95
    c.optim.critic_lr = 1e-5
    c.optim.critic_warmup_ratio = 0.015  # train_ppo.sh: critic.optim.lr_warmup_steps_ratio
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.validation.every = 25
    c.validation.engine = "searchr1"
    c.validation.url = "http://127.0.0.1:8000/retrieve"
    c.validation.topk = 5  # the paper evaluates with five documents
    c.checkpoint.every = 25
    c.checkpoint.keep = 3
    # Fully sharded data parallel over every chip (e.g. a v4-32 or v5e-32 slice).
    c.mesh.shape = (1, -1, 1)
    # mesh.axis_rules: the default's (batch over data x fsdp, every weight's embed axis over fsdp).
    # The 14B simulator is served by SGLang on its own machines; an in-process simulator
    # (simulator.kind = "llm") could take e.g. 4 chips per host here instead.
    c.mesh.simulator_devices = 0
    return c
