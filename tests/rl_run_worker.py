"""A tiny GRPO run in its own process, for the kill -9, hanging-reward and lock tests (tests/test_rl_runs.py).

    python tests/rl_run_worker.py OUT_DIR '{"overlap": "sync", "checkpoint_every": 1, "total_steps": 8, ...}'

Options (JSON): loop fields, plus "reward": "ok" | "hang_sync" | "hang_async" (prompts whose
id ends in 2 or 5 hang forever), "eval": true (a reward eval hook on 4 held-out prompts),
"kill_in_final_eval": true (SIGKILL itself inside the final evaluation, after the last
checkpoint). Prints "returned <time>" when train() returns.
"""

import asyncio
import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RUBRAX_JAX_CACHE", "0")


def _hangs(prompt_ids):
    return any(str(p).endswith(("2", "5")) for p in prompt_ids)


def hang_sync(prompts, completions, prompt_id=None, **_):
    if _hangs(prompt_id or ()):
        threading.Event().wait()
    return [float("yes" in c.split()) for c in completions]


async def hang_async(prompts, completions, prompt_id=None, **_):
    if _hangs(prompt_id or ()):
        await asyncio.Event().wait()
    return [float("yes" in c.split()) for c in completions]


def main(out_dir, opts):
    import jax

    from rubrax.models import ModelConfig, init_params
    from rubrax.policy import SampleConfig
    from rubrax.rl.hooks import reward_eval_hook
    from rubrax.rl.loop import LoopConfig, train
    from rubrax.rl.prompts import load_prompts
    from rubrax.rl.step import RLConfig
    from rubrax.rl.toy import TargetWordReward, toy_prompts, toy_tokenizer
    from rubrax.sharding import make_mesh
    from rubrax.train.optim import OptimConfig

    tok = toy_tokenizer()
    config = ModelConfig.tiny(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    sample = SampleConfig(max_new_tokens=6, n=4, prompt_bucket=8)
    kind = opts.pop("reward", "ok")
    reward = {"ok": TargetWordReward(target="yes"), "hang_sync": hang_sync, "hang_async": hang_async}[kind]
    want_eval, kill = opts.pop("eval", False), opts.pop("kill_in_final_eval", False)
    loop = LoopConfig(**{"total_steps": 8, "prompts_per_step": 2, "max_prompt_tokens": 8, "progress": False, "out_dir": out_dir, **opts})
    hooks = []
    if want_eval:
        held = [{"prompt": p["prompt"], "prompt_id": f"h{i}"} for i, p in enumerate(toy_prompts(4, seed=1))]
        import inspect

        # (timeout_s is passed only where the hook has it: the same worker runs against older code.)
        extra = {"timeout_s": loop.reward_timeout_s} if "timeout_s" in inspect.signature(reward_eval_hook).parameters else {}
        inner = reward_eval_hook(load_prompts(held, tok, max_prompt_tokens=8), reward, tok, config,
                                 SampleConfig(max_new_tokens=6, n=1, temperature=0.0), max_prompt_tokens=8, **extra)

        def hook(step, params):
            if kill and step == loop.total_steps:
                os.kill(os.getpid(), signal.SIGKILL)
            return inner(step, params)

        hooks.append(hook)
    prompts = [{**p, "prompt_id": f"p{i}"} for i, p in enumerate(toy_prompts(16))]
    train(params=init_params(config, jax.random.PRNGKey(0)), model_config=config, tokenizer=tok, reward_fn=reward,
          prompts=prompts, rl=RLConfig(group_size=4), sample=sample,
          optim=OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0), loop=loop, eval_hooks=hooks,
          mesh=make_mesh(jax.devices()[:1]))
    print(f"returned {time.time()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
