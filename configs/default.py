"""The embedded default: ZeroSearch on the synthetic world with SmolLM2-135M-Instruct.

Policy and simulator are the embedded SmolLM2-135M-Instruct (no hub needed); training questions
come from the synthetic knowledge world, whose answers no model knows without searching;
validation uses a real engine (BM25 over the world's passages). Three stages: the policy's
format warm-up, simulator tuning, then GRPO; sized for about 20 minutes on a 2-core CPU
(docs/training.md has the measured run):

    python -m zerosearch_jax.train --config=configs/default.py --workdir=runs/default
"""

import ml_collections

from configs import simulator_sft


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # every random choice (data order, sampling, coin flips) derives from it.
    c.total_steps = 6  # RL steps (upstream: 203).
    # A finished run's workdir whose stages (warmup/, simulator_sft/) this run reuses instead of
    # running its own (sweeps over RL settings); "" = run them in this run's workdir.
    c.stages_dir = ""

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
    # Questions used for validation (a fixed sample, shared evenly among the sources: single-
    # and two-hop). One question moves F1 by 1/64; each F1 is logged with its 95% interval.
    c.data.validation_size = 64
    c.data.validation_stratify = True
    c.data.validation_seed = 0  # the sample's seed: the same questions for every run seed.
    # RL batches drawn evenly from the training sources (half single-hop, half two-hop in the
    # synthetic world, whose training split is one third two-hop); False: uniformly.
    c.data.train_stratify = False
    c.data.on_error = "skip"  # malformed rows: skip (logged) or raise.

    # -- rollout --------------------------------------------------------------------------------
    c.prompts_per_step = 4  # questions per RL step (upstream: 64).
    # Write each RL step's episodes (question, response, reward, queries and coins, GRPO group)
    # to <workdir>/train_traces/step_<N>.jsonl: what RL was rewarded for, episode by episode.
    c.train_traces = False
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
    # A query the episode already searched gets its earlier documents and coin again (a real
    # engine answers a repeated query alike). Upstream (False) draws a new coin and page per
    # call, so the simulator rewards searching the same query twice.
    c.rollout.reuse_repeated_queries = False
    # A GRPO group's searches at one turn share their useful/noisy coin (common random
    # numbers); False = upstream, a coin per call.
    c.rollout.group_coins = False

    c.warmup = warmup()
    c.simulator = simulator(c)

    # -- curriculum -----------------------------------------------------------------------------
    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.schedule = "exponential"  # exponential | linear | constant
    c.curriculum.start = 0.0  # p_noise at the first step.
    c.curriculum.end = 0.5  # p_noise at the last step.
    c.curriculum.base = 4.0

    c.algorithm = algorithm()
    c.optim = optimizer()

    c.validation = validation()
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 3
    c.checkpoint.keep = 2
    # A finished pre-RL stage's checkpoints are removed once its hf/ export is written.
    c.checkpoint.keep_stage_checkpoints = False
    c.export_hf = True  # write the final policy as a HF directory (<workdir>/hf_policy).
    c.max_nonfinite_steps = 3  # consecutive skipped updates before the run stops.

    c.mesh = mesh()
    return c


def warmup() -> ml_collections.ConfigDict:
    """The format warm-up, the stage before RL."""
    # A 135M policy cannot follow the template unaided, so RL would see only zero rewards:
    # behaviour cloning on demonstration episodes (search the question, read real BM25
    # documents, answer; agent/warmup.py) first, cached in <workdir>/warmup. The paper's
    # configs set steps = 0 (their 3B/7B policies need none).
    w = ml_collections.ConfigDict()
    w.steps = 10  # behaviour-cloning steps (0: no warm-up); the loss is ~0.06 by step 9.
    w.num_questions = 48  # training questions to demonstrate (those whose visible
    # documents lack a gold answer are dropped).
    # Share them evenly among the training data's sources (single- and two-hop): the world's
    # training split is one third two-hop, too few demonstrations of the second search.
    w.stratify = False
    # The fraction of single-hop demonstrations that search a second time, for their answer's
    # own page (agent/warmup.py, synthetic world only): the second search RL may learn to make
    # on every question then returns the right page on single-hop questions too.
    w.reread_single_hop = 0.0
    w.batch_size = 4
    w.lr = 5e-5
    # A step's demonstrations packed several to a row, two of ~400 tokens in a 1024-token row
    # (0: one demonstration per row, padded to the bucketed width).
    w.pack_length = 1024
    w.micro_batch_size = 1  # packed rows per forward/backward.
    return w


def validation() -> ml_collections.ConfigDict:
    """Validation with a real engine (before RL, every `every` steps, after the last)."""
    v = ml_collections.ConfigDict()
    # Steps between validations (also before the first and after the last step). 64 questions
    # cost ~4x the time of 16 on a CPU: the default validates before and after RL only.
    v.every = 6
    # The warmed-up policy's validation at step 0. Runs that share one run's stages
    # (stages_dir) share its step-0 validation too (greedy, the same questions): False skips it.
    v.before_rl = True
    v.engine = "bm25"  # bm25 (over the world / a corpus) | searchr1 | serpapi
    v.corpus = ""  # bm25: "" = the synthetic world's passages, "wiki", or a jsonl.
    v.url = ""
    v.topk = 3
    return v


def algorithm() -> ml_collections.ConfigDict:
    """The RL algorithm (docs/method.md §7): GRPO with a KL loss, packed updates."""
    # -- algorithm ------------------------------------------------------------------------------
    a = ml_collections.ConfigDict()
    a.estimator = "grpo"  # reinforce | grpo | gae (PPO) | reinforce_pp
    a.ppo_epochs = 1
    a.num_minibatches = 1
    # Rows per forward/backward (packed rows when packing). One: a step runs as many packed
    # rows as its episodes fill (two a micro-batch would round up to an even number), at the
    # same speed per token (docs/benchmarks.md, update phase).
    a.micro_batch_size = 1
    # Scoring and update rows of pack_length tokens, each holding several episodes (attention
    # within each, a GRPO group's prompt once per row): they pay for real tokens, not for
    # padding to the longest episode. 0: one episode a row. At least the longest possible
    # episode (rollout.max_prompt_tokens + the response's turns and observations, 912 here).
    # 944 holds one GRPO group of four one-search episodes (its prompt once, ~900-930 tokens)
    # a row: on 90 real RL batches 7.0% of the slots are padding against 12.6% at 1024, and a
    # real batch's score + update ran 1.1x faster (docs/benchmarks.md, update phase).
    a.pack_length = 944
    a.clip_low = 0.2
    a.clip_high = 0.2
    a.entropy_coef = 0.001
    a.kl_coef = 0.001
    a.kl_estimator = "low_var_kl"  # k1 | abs | mse | low_var_kl
    a.use_kl_loss = True
    a.kl_in_reward = False  # PPO upstream: KL in the reward instead.
    # The loss mask: train on the policy's own tokens only (False: the paper's ablation, the
    # inserted documents are trained on too).
    a.mask_observations = True
    a.upstream_kl_sign = False  # True reproduces upstream's subtracted KL (a bug).
    a.gamma = 1.0
    a.lam = 1.0
    a.value_clip = 0.5

    return a


def optimizer() -> ml_collections.ConfigDict:
    """AdamW for the actor and the critic."""
    # -- optimizer ------------------------------------------------------------------------------
    o = ml_collections.ConfigDict()
    # upstream 1e-6 over ~200 steps; the default's 6 steps move nothing at 5e-6 (KL <= 0.0014)
    # and collapse at 5e-5 by step 3; at 2e-5 the outcome depends on the seed (seed 0 +0.016,
    # seed 1 -0.156 against the warm-up), at 1e-5 too (-0.078, -0.016; docs/science.md).
    o.lr = 2e-5
    o.warmup_ratio = 0.0  # upstream: 0.95 (REINFORCE/GRPO), 0.285 (PPO actor).
    o.b1 = 0.9
    o.b2 = 0.999
    o.weight_decay = 0.01
    o.grad_clip = 1.0
    o.critic_lr = 1e-5
    o.critic_warmup_ratio = 0.0
    return o


def mesh() -> ml_collections.ConfigDict:
    """Devices: data parallel over every device; the simulator shares them."""
    # -- mesh ------------------------------------------------------------------------------------
    m = ml_collections.ConfigDict()
    m.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices.
    # (logical axis, mesh axes) pairs placing weights, KV caches and batches (sharding.py).
    m.axis_rules = (
        ("batch", ("data", "fsdp")),  # rollout and update batches: data parallel.
        ("vocab", "tensor"),
        ("embed", "fsdp"),  # weights fully sharded over fsdp (gathered layer by layer).
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),  # also the KV cache's heads.
        ("head_dim", None),
    )
    m.simulator_devices = 0  # >0: the llm simulator gets the last n devices of each host.
    m.simulator_shape = (-1, 1, 1)  # (data, fsdp, tensor) of that simulator sub-mesh.
    return m


def simulator(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The simulated search engine used for training: the embedded model, tuned before RL."""
    # -- simulated search engine used for training --------------------------------------------
    s = ml_collections.ConfigDict()
    s.kind = "llm"  # llm (in process) | server (OpenAI-compatible) | bm25 | searchr1
    s.model = "smollm2-135m-instruct"  # llm: the simulator (the base, if tuned).
    # Tune simulator.model with the simulator-SFT pipeline before RL (BM25 results on the
    # world, labelled, fine-tuned; after the warm-up, whose policy collects when
    # sft.collect.query_sources names it), cached in <workdir>/simulator_sft; its settings are
    # configs/simulator_sft.py's, sized down here.
    s.tune = True
    s.sft = simulator_sft.get_config()
    s.sft.seed = c.get_ref("seed")
    s.sft.data.synthetic_seed = c.data.get_ref("synthetic_seed")  # the same world
    # Each question searched as itself, no policy trajectories: the warmed-up policy searches
    # the question word for word (252 of its 256 collection queries, seed 1), so its
    # trajectories (2 min of rollouts) only duplicated the question's pairs. The same ~2 min
    # pays for 16 more tuning steps, and twice the questions for as many examples
    # (docs/simulator_sft.md#collecting-by-the-question-alone-2026-12-04-night).
    s.sft.collect.query_sources = "question"
    s.sft.data.num_questions = 256
    # 30% of them held out: the report asks for both page kinds on 32 of their queries.
    s.sft.label.heldout_fraction = 0.3
    s.sft.finetune.steps = 48  # 192 examples: about 0.7 of a pass over the ~270 balanced ones
    s.sft.finetune.remat = False
    # The answer's tokens weigh 8x in useful targets: at 32 steps the tuned model writes pages
    # in the world's style but with its own facts; the weight makes it copy the answer the prompt
    # names (useful pages holding it 0.32 -> 0.55 on the 64 validation questions,
    # docs/simulator_sft.md). 384 tokens hold every prompt + target whole (at 320 over half the
    # targets lost their last documents, so the model rarely saw a page end).
    s.sft.finetune.answer_weight = 8.0
    # The newlines that end documents and the page's end-of-turn token weigh 8x too: without
    # it ~1 noisy page in 10 ran one document on until the cap (a repetition loop), under the
    # 0.90 format validity the job asks of its simulator (docs/simulator_sft.md).
    s.sft.finetune.boundary_weight = 8.0
    s.sft.finetune.max_length = 384
    s.sft.report.num_queries = 32
    # The prompted base model's row (1.5 min on 32 queries) is the ablations' prompted-simulator
    # row instead (configs/sweeps/ablations.py).
    s.sft.report.compare_base = False
    s.url = ""  # server / searchr1: endpoint.
    s.variant = "finetuned"  # finetuned (SFT prompt) | prompted (one-shot demo).
    s.prime_reply = False  # start the reply with "Doc 1:" (small prompted models).
    # llm: a noisy page may not complete the gold answer's tokens. The noisy prompt names the
    # answer too, and the tuned 135M simulator copies it into noisy pages as often as into
    # useful ones (docs/simulator_sft.md), so without this the noise curriculum changes nothing.
    s.block_answer = True
    s.sft.report.block_answer = s.get_ref("block_answer")  # the report measures what RL uses
    # A two-hop question's first-hop query (one that names none of its bridge entity's names)
    # gets a page for the bridge, not the final answer, as the real engine's would
    # (`search.simulator.hop_context`; the host loop only). Upstream tells the simulator the
    # final answer whatever the query (False).
    s.hop_answers = False
    s.max_new_tokens = 128  # upstream: 600. The policy sees at most
    # rollout.max_obs_tokens = 128 of a page (documents are cut from the end), so more is waste.
    s.temperature = 0.8
    s.topk = 5
    return s
