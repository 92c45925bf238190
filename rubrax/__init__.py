"""rubrax: rubric-based reward modelling and RL post-training of LLMs in JAX.

Implements "Chasing the Tail: Effective Rubric-based Reward Modeling for LLM
Post-Training" (arXiv 2509.21500). Importing the top-level package is cheap: it
does not import jax, so host-side tools (rubric elicitation, grading) start fast.

Layers, top first. A module imports from its own layer or lower ones, never higher;
tests/test_architecture.py walks the import graph and holds every module to this:

    entry points   cli, main_job, the */cli.py sub-commands (but elicit/cli, whose endpoint
                   flags rubrax.generate shares, sits with the workflows), experiments/
    testbed        sim/ (the tail world; registers its own rewards, the core never names it)
    workflows      rl/ loop and its modules (prompts, rollouts, reward_runner, resume, runlog,
                   hooks, recipe, export, monitor), train/ (trainer, sft, reward_model, pair_sets,
                   metrics), elicit/, eval/, generate, plan, report, forecast, pipeline/ (the paper's
                   stages end to end, composed of the other workflows)
    rewards        rewards/ (the RewardFn protocol, the lazy registry, combinators, BT,
                   rubric), rl/toy (the toy task's reward)
    device core    policy, models/ (Flax LMs, checkpoints, tokenizers), rl/ step, batch,
                   losses, advantages, state, sharding, train/ optim and checkpoint
    leaves         theory/, rubric (Criterion, Rubric, verdicts, aggregate), data/ (file
                   formats), hostmem, jaxcache, runs, validate

Shape letters, in names such as `logp_BxT` (one alphabet for the whole package):

    B rows (sequences in a batch: P prompts x G samples)
    P prompts
    G group size (samples per prompt)
    W prompt width (left-padded prompt tokens)
    C completion length (new tokens)
    T = W + C (a full row)
    S cache slots (KV-cache length)
    V vocabulary
    D model width
    L layers
"""

__version__ = "0.1.0"
