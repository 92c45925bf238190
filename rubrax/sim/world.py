"""Tail world: a seeded family of synthetic tasks with a known gold reward.

Why this world. The paper's claim is about *where* a proxy reward is wrong: errors
among the best responses (the high-reward tail, rare under the base policy) cause
over-optimisation; off-policy exemplars reveal the tail but carry artifacts of their
source. The world is built so that each of those mechanisms is present by
construction and can be dialled up or down:

* Prompts and responses are short word sequences over a small vocabulary. A prompt
  reads ``explain <topic> <aspect>``; those two words are the only requirements it
  reveals.
* Hidden requirements come in tiers (weights as the paper's 1..3 rubric weights):

    basic     (weight 1)  mention the topic, mention the aspect, length within
                          [min_len, max_len] words -- the base policy usually meets them;
    advanced  (weight 2)  mention each of `n_advanced` hidden words of this prompt --
                          the base policy meets each one rarely;
    excellent (weight 3)  mention hidden advanced word j *before* hidden excellent
                          word j -- the base policy almost never does (the tail).

  Hidden words are drawn per prompt from one shared pool of content words, so a word
  that is substance for one prompt is noise for another: quality is prompt-specific,
  and a reward model must condition on the prompt to learn it.
* Each prompt also has `n_decoys` decoy words: words a reader associates with the
  prompt (the base demonstrations use them often) but which the gold reward ignores.
  They are the simulated proposer's "plausible but wrong" guesses.
* Gold reward (the unobservable r*):

      r*(x, y) = sum_i w_i [y satisfies requirement i] / sum_i w_i
                 - repetition_penalty * max(0, rep(y) - repetition_free)
                 - length_penalty * max(0, |y| - max_len)

  with rep(y) = 1 - (#distinct words)/|y|, the fraction of repeated words. The two
  penalties make degenerate outputs (a word repeated, padding with length) lose
  gold even when a proxy pays for them.
* Gold pairwise judge (the stand-in for GPT-4.1): prefers a over b with probability
  sigmoid((r*(a) - r*(b)) / judge_temperature); exact ties are a coin flip.

Superficial artifacts live in the generators (rubrax.sim.generators): each "great"
generator has a signature word (one of `SIGNATURE_WORDS`) that it uses more the better
its answer is. The gold reward never looks at signature or filler words.

Host side only (numpy, no jax).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from rubrax.sim.predicates import Predicate

Tier = Literal["basic", "advanced", "excellent"]
TIERS: tuple[str, ...] = ("basic", "advanced", "excellent")

PROMPT_VERB = "explain"
FILLER_WORDS: tuple[str, ...] = (
    "the", "and", "so", "it", "is", "this", "also", "then", "we", "can", "note", "thus",
    "here", "of", "to", "a",
)
# LLM-isms: each great generator has one as its superficial signature.
SIGNATURE_WORDS: tuple[str, ...] = ("indeed", "notably", "crucially", "delve", "furthermore", "overall")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def content_word_pool(n: int) -> tuple[str, ...]:
    """`n` distinct two-syllable nonsense words (fixed list; the world seed assigns roles).

    Nonsense words keep the world free of any prior meaning: nothing but the world's
    own rules says which word matters for which prompt.
    """
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    rng = np.random.default_rng(0)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = "".join(syllables[i] for i in rng.integers(0, len(syllables), size=2))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return tuple(words)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """A tail world. Defaults and why:

    n_prompts=8: enough prompts that hidden words differ across prompts (quality is
      prompt-specific), few enough that a 2-layer model learns them in tens of steps.
    n_advanced=4, n_excellent=2: per prompt, 4 advanced (weight 2) and 2 excellent
      (weight 3) requirements; with 3 basic ones, total weight 3 + 8 + 6 = 17, so
      the tail (excellent) is 35% of the gold scale -- worth chasing.
    n_decoys=2: two plausible-but-wrong words per prompt for the proposer to guess.
    n_content_words=40: the pool all requirement and decoy words are drawn from.
    n_great=4: four great generators, each strong on a different subset (diversity).
    min_len=4, max_len=18: the basic length requirement; also where the over-length
      penalty starts. Responses are sampled with at most 24 tokens, so the policy
      *can* overrun max_len and pay for it.
    repetition_free=0.25, repetition_penalty=2.0: a few repeated function words are
      free; a response that is mostly one word repeated loses up to ~1.5.
    length_penalty=0.05 per word over max_len.
    judge_temperature=0.05: gold differences of one advanced requirement (2/17=0.12)
      are judged right ~91% of the time; ties are coin flips.
    """

    seed: int = 0
    n_prompts: int = 8
    n_advanced: int = 4
    n_excellent: int = 2
    n_decoys: int = 2
    n_content_words: int = 40
    n_great: int = 4
    min_len: int = 4
    max_len: int = 18
    basic_weight: float = 1.0
    advanced_weight: float = 2.0
    excellent_weight: float = 3.0
    repetition_free: float = 0.25
    repetition_penalty: float = 2.0
    length_penalty: float = 0.05
    judge_temperature: float = 0.05

    def __post_init__(self) -> None:
        for name in ("n_prompts", "n_content_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_advanced", "n_excellent", "n_decoys", "n_great"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_excellent > self.n_advanced:
            raise ValueError(
                f"WorldConfig.n_excellent={self.n_excellent} > n_advanced={self.n_advanced}: "
                "each excellent requirement orders one advanced word before one excellent word"
            )
        needed = 2 + self.n_advanced + self.n_excellent + self.n_decoys
        if needed > self.n_content_words:
            raise ValueError(
                f"WorldConfig: each prompt needs {needed} distinct content words (topic, aspect, "
                f"n_advanced={self.n_advanced}, n_excellent={self.n_excellent}, n_decoys={self.n_decoys}) "
                f"but the vocabulary has n_content_words={self.n_content_words}"
            )
        if self.n_prompts > self.n_content_words * (self.n_content_words - 1):
            raise ValueError(
                f"WorldConfig.n_prompts={self.n_prompts}: only {self.n_content_words * (self.n_content_words - 1)} "
                "distinct (topic, aspect) prompts exist with this vocabulary"
            )
        if self.n_great > len(SIGNATURE_WORDS):
            raise ValueError(f"WorldConfig.n_great={self.n_great}: at most {len(SIGNATURE_WORDS)} signature words exist")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"WorldConfig: need 1 <= min_len <= max_len, got min_len={self.min_len} max_len={self.max_len}")
        for name in ("basic_weight", "advanced_weight", "excellent_weight", "judge_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"WorldConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("repetition_penalty", "length_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.repetition_free < 1:
            raise ValueError(f"WorldConfig.repetition_free must be in [0, 1), got {self.repetition_free}")


@dataclasses.dataclass(frozen=True)
class Requirement:
    tier: Tier
    predicate: Predicate
    weight: float


@dataclasses.dataclass(frozen=True)
class SimPrompt:
    """One task. `advanced[j]` and `excellent[j]` are word j of each hidden tier."""

    id: str
    text: str
    topic: str
    aspect: str
    advanced: tuple[str, ...]
    excellent: tuple[str, ...]
    decoys: tuple[str, ...]
    requirements: tuple[Requirement, ...]


@dataclasses.dataclass(frozen=True)
class GoldBreakdown:
    reward: float
    met: dict[str, float]  # tier -> fraction of that tier's weight met
    repetition: float
    over_length: int


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def words_of(response: str) -> list[str]:
    return response.split()


class World:
    """The prompts, vocabulary, gold reward and gold judge of one seeded tail world."""

    def __init__(self, config: WorldConfig):
        self.config = config
        self.content_words = content_word_pool(config.n_content_words)
        self.signature_words = SIGNATURE_WORDS[: config.n_great]
        self.filler_words = FILLER_WORDS
        self.prompts = self._make_prompts()
        self._by_id = {p.id: p for p in self.prompts}
        self._roles = {p.id: self._roles_of(p) for p in self.prompts}

    # ------------------------------------------------------------------ construction
    def _make_prompts(self) -> tuple[SimPrompt, ...]:
        c = self.config
        rng = np.random.default_rng([c.seed, 1])
        pool = np.array(self.content_words)
        prompts, seen = [], set()
        while len(prompts) < c.n_prompts:
            w = [str(x) for x in rng.choice(pool, size=2 + c.n_advanced + c.n_excellent + c.n_decoys, replace=False)]
            topic, aspect = w[0], w[1]
            if (topic, aspect) in seen:
                continue
            seen.add((topic, aspect))
            adv = tuple(w[2 : 2 + c.n_advanced])
            exc = tuple(w[2 + c.n_advanced : 2 + c.n_advanced + c.n_excellent])
            dec = tuple(w[2 + c.n_advanced + c.n_excellent :])
            reqs = [
                Requirement("basic", Predicate("contains", a=topic), c.basic_weight),
                Requirement("basic", Predicate("contains", a=aspect), c.basic_weight),
                Requirement("basic", Predicate("length", lo=c.min_len, hi=c.max_len), c.basic_weight),
            ]
            reqs += [Requirement("advanced", Predicate("contains", a=a), c.advanced_weight) for a in adv]
            reqs += [
                Requirement("excellent", Predicate("order", a=adv[j], b=exc[j]), c.excellent_weight)
                for j in range(c.n_excellent)
            ]
            i = len(prompts)
            prompts.append(
                SimPrompt(
                    id=f"p{i}", text=f"{PROMPT_VERB} {topic} {aspect}", topic=topic, aspect=aspect,
                    advanced=adv, excellent=exc, decoys=dec, requirements=tuple(reqs),
                )
            )
        return tuple(prompts)

    def _roles_of(self, p: SimPrompt) -> dict[str, str]:
        roles = {w: "signature" for w in self.signature_words}
        roles.update({w: "filler" for w in self.filler_words})
        roles.update({w: "decoy" for w in p.decoys})
        roles.update({w: "advanced" for w in p.advanced})
        roles.update({w: "excellent" for w in p.excellent})
        roles.update({p.topic: "basic", p.aspect: "basic"})
        return roles

    # ------------------------------------------------------------------ queries
    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every word a response or prompt can use (without special tokens)."""
        return (PROMPT_VERB, *self.content_words, *self.filler_words, *SIGNATURE_WORDS)

    def prompt(self, prompt_id: str) -> SimPrompt:
        try:
            return self._by_id[prompt_id]
        except KeyError:
            raise KeyError(f"tail world has no prompt_id {prompt_id!r} (has {self.prompts[0].id}..{self.prompts[-1].id})") from None

    def word_role(self, prompt_id: str, word: str) -> str:
        """basic | advanced | excellent | decoy | signature | filler | other, for this prompt.

        The simulated proposer uses this to *recognise* substance in a response it
        reads: recognising quality when shown it is easier than producing it from the
        prompt alone, which is the premise of refinement through differentiation.
        """
        return self._roles[prompt_id].get(word, "other")

    @property
    def total_weight(self) -> float:
        return sum(r.weight for r in self.prompts[0].requirements)

    def gold_breakdown(self, prompt_id: str, response: str) -> GoldBreakdown:
        c = self.config
        p = self.prompt(prompt_id)
        words = words_of(response)
        met: dict[str, float] = {t: 0.0 for t in TIERS}
        tot: dict[str, float] = {t: 0.0 for t in TIERS}
        for r in p.requirements:
            tot[r.tier] += r.weight
            if r.predicate.check(words):
                met[r.tier] += r.weight
        total = sum(tot.values())
        score = sum(met.values()) / total
        rep = 1.0 - len(set(words)) / len(words) if words else 0.0
        over = max(0, len(words) - c.max_len)
        score -= c.repetition_penalty * max(0.0, rep - c.repetition_free) + c.length_penalty * over
        return GoldBreakdown(
            reward=float(score),
            met={t: (met[t] / tot[t] if tot[t] else 1.0) for t in TIERS},
            repetition=float(rep),
            over_length=over,
        )

    def gold_reward(self, prompt_id: str, response: str) -> float:
        """r*(x, y): weighted fraction of requirements met minus degenerate-output penalties."""
        return self.gold_breakdown(prompt_id, response).reward

    def gold_rewards(self, prompt_ids: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompt_ids) != len(responses):
            raise ValueError(f"gold_rewards: {len(prompt_ids)} prompt ids for {len(responses)} responses")
        return np.array([self.gold_reward(p, r) for p, r in zip(prompt_ids, responses)], dtype=np.float64)

    def judge_prob(self, prompt_id: str, response_a: str, response_b: str) -> float:
        """P(gold judge prefers a over b) = sigmoid((r*(a) - r*(b)) / judge_temperature)."""
        d = self.gold_reward(prompt_id, response_a) - self.gold_reward(prompt_id, response_b)
        return sigmoid(d / self.config.judge_temperature)

    def judge(self, prompt_id: str, response_a: str, response_b: str, rng: np.random.Generator) -> int:
        """The noisy gold judge: 0 if it prefers a, 1 if it prefers b."""
        return int(rng.random() >= self.judge_prob(prompt_id, response_a, response_b))


def make_world(config: WorldConfig | None = None, **overrides) -> World:
    """A world from a config (or WorldConfig(**overrides))."""
    if config is None:
        config = WorldConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return World(config)
