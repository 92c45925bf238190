"""Configurations of the tail-world experiment: the `cpu` preset (the README's main
job, <= 10 minutes on a 2-core machine) and the `study` preset (more seeds, more
steps). Every setting is a frozen, keyword-only dataclass validated in
__post_init__, so a bad configuration fails before any training starts.

Why the cpu defaults (see also WorldConfig, GeneratorsConfig, ProposerConfig):
* model: hidden 64, 2 layers, 4 heads: a ~0.1M-parameter decoder learns the
  world's 8 prompts in a few hundred SFT steps and takes an RL step in well under a
  second on a CPU.
* base SFT: 600 demonstrations per prompt (base generator), 300 steps of batch 32, lr
  3e-3 cosine: the base policy then meets ~6% of advanced requirements and an
  excellent one in ~0.1-0.4% of samples (the tail is rare).
* SFT arm: 64 great responses per prompt (all great generators), 40 steps at lr 1e-3,
  evaluated every `eval_every` steps like the RL arms.
* RL (`rl` RLConfig, `optim` OptimConfig, `sample` SampleConfig: the objects
  rubrax.rl.loop.train takes): all 8 prompts x 8 rollouts per step, 50 steps, lr 1e-3
  (10% warmup, then constant, as the paper), KL coefficient 0.01 (the paper's),
  temperature 1, at most 24 new tokens: the same settings for every arm. Measured: lr
  3e-3 collapses every arm within ~10 steps; 5e-4 x 40 steps is stable but the rubric
  arms barely move. Each arm checkpoints every `checkpoint_every` steps, so a killed run
  resumes inside the arm.
* BT: 64 labelled pairs per prompt, 3 epochs, lr 1e-3, backbone initialised from the
  base policy (as the paper's BT model starts from an instruction-tuned LM).
* rubrics: pools of 16 candidates and 4 RTD rounds, as in the paper.
* eval: 128 base samples per prompt give the base policy's gold CDF F0 (win rate
  = E_{y~pi}[F0(r*(y))], ties half -- the quantity Proposition 1 predicts) and the
  samples on which the theory link is computed.
"""

from __future__ import annotations

import dataclasses

from rubrax.policy import SampleConfig
from rubrax.rl.step import RLConfig
from rubrax.sim.agents import ProposerConfig, VerifierConfig
from rubrax.sim.generators import GeneratorsConfig
from rubrax.sim.world import WorldConfig
from rubrax.train.optim import OptimConfig

ARMS: tuple[str, ...] = (
    "gold",
    "bt_on_policy",
    "bt_off_policy",
    "bt_mixed",
    "sft_great",
    "rubric_initial",
    "rubric_1_good",
    "rubric_1_great",
    "rubric_4_great",
    "rubric_4_great_diverse",
)
ARM_LABELS: dict[str, str] = {
    "gold": "gold reward (oracle)",
    "bt_on_policy": "BT, on-policy pairs",
    "bt_off_policy": "BT, off-policy great pairs",
    "bt_mixed": "BT, on- + off-policy pairs",
    "sft_great": "SFT on great responses",
    "rubric_initial": "rubric: initial (prompt only)",
    "rubric_1_good": "rubric: 1 good pair",
    "rubric_1_great": "rubric: 1 great pair",
    "rubric_4_great": "rubric: 4 great pairs",
    "rubric_4_great_diverse": "rubric: 4 great & diverse pairs",
}


def _positive(obj: object, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if not v > 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be > 0, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSettings:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelSettings: hidden_size={self.hidden_size} must divide into num_attention_heads="
                f"{self.num_attention_heads}, a multiple of num_key_value_heads={self.num_key_value_heads}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSettings:
    """Supervised fine-tuning: the base policy (on base demonstrations) and the
    `sft_great` arm (on great responses, from the base policy, for `great_steps`)."""

    demos_per_prompt: int = 600
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    great_per_prompt: int = 64
    great_steps: int = 40
    great_lr: float = 1e-3

    def __post_init__(self) -> None:
        _positive(self, "demos_per_prompt", "steps", "batch_size", "lr", "great_per_prompt", "great_steps", "great_lr")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BTSettings:
    pairs_per_prompt: int = 64
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3

    def __post_init__(self) -> None:
        _positive(self, "pairs_per_prompt", "epochs", "batch_size", "lr")


def default_rl() -> RLConfig:
    return RLConfig(group_size=8, kl_coef=0.01)


def default_optim() -> OptimConfig:
    return OptimConfig(learning_rate=1e-3, schedule="constant", warmup_ratio=0.1, max_grad_norm=1.0)


def default_sample(group_size: int = 8, max_new_tokens: int = 24) -> SampleConfig:
    # world prompts are ~8 tokens with the chat template; the default bucket (16) would waste 2x
    return SampleConfig(max_new_tokens=max_new_tokens, temperature=1.0, n=group_size, prompt_bucket=8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RubricSettings:
    pool_size: int = 16
    rounds: int = 4

    def __post_init__(self) -> None:
        _positive(self, "pool_size", "rounds")
        if self.pool_size < 2 * self.rounds:
            raise ValueError(f"RubricSettings: pool_size={self.pool_size} is too small for {self.rounds} rounds that each drop a pair")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings:
    base_samples_per_prompt: int = 128
    eval_samples_per_prompt: int = 16
    agreement_pairs_per_prompt: int = 64
    theory_betas: int = 48

    def __post_init__(self) -> None:
        _positive(self, "base_samples_per_prompt", "eval_samples_per_prompt", "agreement_pairs_per_prompt", "theory_betas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimConfig:
    """One tail-world experiment: `seeds` replicate the whole pipeline (world draw,
    base policy, off-policy data, rubrics, reward models, RL) for each arm in `arms`."""

    name: str = "cpu"
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = ARMS
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    generators: GeneratorsConfig = dataclasses.field(default_factory=GeneratorsConfig)
    proposer: ProposerConfig = dataclasses.field(default_factory=ProposerConfig)
    verifier: VerifierConfig = dataclasses.field(default_factory=VerifierConfig)
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    sft: SFTSettings = dataclasses.field(default_factory=SFTSettings)
    bt: BTSettings = dataclasses.field(default_factory=BTSettings)
    rl: RLConfig = dataclasses.field(default_factory=default_rl)
    optim: OptimConfig = dataclasses.field(default_factory=default_optim)
    sample: SampleConfig = dataclasses.field(default_factory=default_sample)
    rl_steps: int = 50
    eval_every: int = 5
    checkpoint_every: int = 25
    rubric: RubricSettings = dataclasses.field(default_factory=RubricSettings)
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "arms", tuple(self.arms))
        if not self.seeds:
            raise ValueError("SimConfig.seeds must name at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"SimConfig.seeds has duplicates: {self.seeds}")
        if not self.arms:
            raise ValueError("SimConfig.arms must name at least one arm")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"SimConfig.arms: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
        if len(self.generators.verbosity) < self.world.n_great:
            raise ValueError(
                f"SimConfig: generators.verbosity has {len(self.generators.verbosity)} entries "
                f"for world.n_great={self.world.n_great}"
            )
        self._check_rl()
        for name in ("base_samples_per_prompt", "eval_samples_per_prompt"):
            if getattr(self.eval, name) % self.rl.group_size:
                raise ValueError(
                    f"SimConfig: eval.{name}={getattr(self.eval, name)} must be a multiple of rl.group_size="
                    f"{self.rl.group_size} (samples are drawn in rollout-shaped chunks: one compilation)"
                )
        if "rubric_4_great" in self.arms or "rubric_4_great_diverse" in self.arms:
            if self.world.n_great < 1:
                raise ValueError("SimConfig: rubric arms on great pairs need world.n_great >= 1")

    def _check_rl(self) -> None:
        _positive(self, "rl_steps", "eval_every", "checkpoint_every")
        if self.rl.group_size < 2:
            raise ValueError(f"SimConfig: rl.group_size must be >= 2 (GRPO compares samples within a group), got {self.rl.group_size}")
        if self.sample.n != self.rl.group_size:
            raise ValueError(f"SimConfig: sample.n={self.sample.n} must equal rl.group_size={self.rl.group_size}")
        if not self.rl.kl_coef > 0:
            # the arms' KL to the base policy is the update's own (it needs the reference logprobs)
            raise ValueError(f"SimConfig: rl.kl_coef must be > 0 (the KL to the base policy is tracked), got {self.rl.kl_coef}")
        if self.sample.max_new_tokens <= self.world.max_len // 2:
            raise ValueError(
                f"SimConfig: sample.max_new_tokens={self.sample.max_new_tokens} leaves no room for a full answer "
                f"(world.max_len={self.world.max_len})"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cpu_preset() -> SimConfig:
    return SimConfig()


def study_preset() -> SimConfig:
    """More seeds and steps for a real study (hours on a CPU, minutes on an accelerator)."""
    return SimConfig(
        name="study",
        seeds=(0, 1, 2, 3, 4),
        world=WorldConfig(n_prompts=16),
        model=ModelSettings(hidden_size=128, intermediate_size=256),
        sft=SFTSettings(steps=600, great_steps=100),
        bt=BTSettings(pairs_per_prompt=128, epochs=4),
        rl_steps=100,
        eval_every=10,
        eval=EvalSettings(base_samples_per_prompt=256, eval_samples_per_prompt=32),
    )


def tiny_preset() -> SimConfig:
    """A seconds-scale run for tests and the notebook (numbers are not meaningful)."""
    return SimConfig(
        name="tiny",
        seeds=(0,),
        world=WorldConfig(n_prompts=4),
        model=ModelSettings(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1),
        sft=SFTSettings(demos_per_prompt=64, steps=30, batch_size=16, great_per_prompt=16, great_steps=3),
        bt=BTSettings(pairs_per_prompt=8, epochs=1, batch_size=8),
        rl=dataclasses.replace(default_rl(), group_size=4),
        sample=default_sample(group_size=4, max_new_tokens=20),
        rl_steps=3,
        eval_every=3,
        checkpoint_every=1,
        rubric=RubricSettings(pool_size=8, rounds=2),
        eval=EvalSettings(base_samples_per_prompt=16, eval_samples_per_prompt=4, agreement_pairs_per_prompt=8, theory_betas=8),
    )


PRESETS = {"cpu": cpu_preset, "study": study_preset, "tiny": tiny_preset}


def get_preset(name: str) -> SimConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
