"""Response generators of the tail world: base demonstrations and off-policy models.

All generators follow one recipe (``GeneratorSpec``): include each requirement word
with a per-tier probability, add decoys and filler words, shuffle, and -- when the
generator "meets" an excellent requirement -- place advanced word j before
excellent word j. What differs is the probabilities and the artifacts:

* ``base``: the demonstrations the base policy is SFT'd on. Usually meets basics
  (p=0.85), rarely mentions any given advanced word (p=0.08), mentions excellent
  words at random places (p=0.04, so the ordered pair appears ~0.2% of the time:
  the tail is rare), uses decoys often, and uses each signature word now and then
  (p=0.03) as plain filler, so that an RL policy *can* find artifacts.
* ``good`` (the weaker off-policy model, "Gemini Flash-Lite"): basics, advanced
  words at p=0.4 each, excellent rarely; no artifact.
* ``great_k`` (the strong, diverse models): each is strong (p=0.9 advanced, 0.65
  excellent) on its own subset of the prompt's advanced/excellent requirements and
  weak (0.15 / 0.03) on the rest; subsets differ across k, so only a *diverse* pool
  covers every requirement. Each has a superficial artifact that tracks the quality
  q in [0, 1] of its own answer (fraction of advanced+excellent weight met):
  ``Binomial(2, artifact_strength * q)`` copies of its signature word and, for the
  verbose ones, ``round(verbosity * q * 3)`` extra filler words. In off-policy
  data the artifact therefore correlates with quality without being quality.

Host side only (numpy).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from rubrax.sim.world import SimPrompt, World


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneratorSpec:
    name: str
    p_basic: float
    p_decoy: float
    p_adv_strong: float
    p_adv_weak: float
    p_exc_strong: float
    p_exc_weak: float
    n_filler: tuple[int, int]
    strong_slot: int = -1  # which diversity slot this generator is strong on; -1: none
    signature: str = ""
    artifact_strength: float = 0.0
    verbosity: float = 0.0
    p_signature_filler: float = 0.0  # signature words sprinkled as plain filler (base)
    ordered_excellent: bool = True  # False: excellent words land at random places

    def __post_init__(self) -> None:
        for name in ("p_basic", "p_decoy", "p_adv_strong", "p_adv_weak", "p_exc_strong", "p_exc_weak",
                     "p_signature_filler"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"GeneratorSpec({self.name}).{name} must be a probability in [0, 1], got {v}")
        if self.artifact_strength < 0 or self.verbosity < 0:
            raise ValueError(f"GeneratorSpec({self.name}): artifact_strength and verbosity must be >= 0")
        lo, hi = self.n_filler
        if not 0 <= lo <= hi:
            raise ValueError(f"GeneratorSpec({self.name}).n_filler must be 0 <= lo <= hi, got {self.n_filler}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneratorsConfig:
    """Knobs of the off-policy generators (defaults: see module docstring).

    artifact_strength: how strongly a great generator's signature word tracks its
      quality (0 = never used, 1 = two copies on a perfect answer on average).
    """

    artifact_strength: float = 0.9
    verbosity: tuple[float, ...] = (0.0, 1.0, 0.5, 1.5, 0.0, 1.0)
    base_p_advanced: float = 0.08
    base_p_excellent: float = 0.04
    base_p_signature: float = 0.03

    def __post_init__(self) -> None:
        if self.artifact_strength < 0:
            raise ValueError(f"GeneratorsConfig.artifact_strength must be >= 0, got {self.artifact_strength}")
        if any(v < 0 for v in self.verbosity):
            raise ValueError(f"GeneratorsConfig.verbosity must be >= 0, got {self.verbosity}")
        for name in ("base_p_advanced", "base_p_excellent", "base_p_signature"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"GeneratorsConfig.{name} must be a probability in [0, 1], got {v}")


def base_spec(cfg: GeneratorsConfig) -> GeneratorSpec:
    return GeneratorSpec(
        name="base", p_basic=0.85, p_decoy=0.5, p_adv_strong=cfg.base_p_advanced, p_adv_weak=cfg.base_p_advanced,
        p_exc_strong=cfg.base_p_excellent, p_exc_weak=cfg.base_p_excellent, n_filler=(3, 8),
        p_signature_filler=cfg.base_p_signature, ordered_excellent=False,
    )


def good_spec() -> GeneratorSpec:
    return GeneratorSpec(
        name="good", p_basic=0.95, p_decoy=0.3, p_adv_strong=0.4, p_adv_weak=0.4,
        p_exc_strong=0.08, p_exc_weak=0.08, n_filler=(2, 5),
    )


def great_specs(world: World, cfg: GeneratorsConfig) -> tuple[GeneratorSpec, ...]:
    n = world.config.n_great
    if len(cfg.verbosity) < n:
        raise ValueError(f"GeneratorsConfig.verbosity has {len(cfg.verbosity)} entries for n_great={n} generators")
    return tuple(
        GeneratorSpec(
            name=f"great_{k}", p_basic=0.97, p_decoy=0.2, p_adv_strong=0.9, p_adv_weak=0.15,
            p_exc_strong=0.65, p_exc_weak=0.03, n_filler=(1, 3), strong_slot=k,
            signature=world.signature_words[k], artifact_strength=cfg.artifact_strength, verbosity=cfg.verbosity[k],
        )
        for k in range(n)
    )


def strong_sets(world: World, prompt: SimPrompt, slot: int) -> tuple[frozenset[int], frozenset[int]]:
    """(advanced indices, excellent indices) that the generator in diversity `slot` is strong on.

    Requirements are dealt round-robin over a per-prompt permutation: with 4
    advanced words and 4 generators, each is strong on 2 advanced words (its own and
    its neighbour's) and on the excellent requirement(s) built on them, so any
    single generator misses half the advanced tier but the four together cover all.
    """
    c = world.config
    if slot < 0 or c.n_great == 0 or c.n_advanced == 0:
        return frozenset(), frozenset()
    rng = np.random.default_rng([c.seed, 2, int(prompt.id[1:])])
    perm = rng.permutation(c.n_advanced)
    per = max(1, -(-2 * c.n_advanced // c.n_great))  # each advanced word covered by ~2 generators
    adv = frozenset(int(perm[(slot + i) % c.n_advanced]) for i in range(min(per, c.n_advanced)))
    exc = frozenset(j for j in range(c.n_excellent) if j in adv)
    return adv, exc


def generate(world: World, spec: GeneratorSpec, prompt: SimPrompt, rng: np.random.Generator) -> str:
    """One response of generator `spec` to `prompt`."""
    c = world.config
    strong_adv, strong_exc = strong_sets(world, prompt, spec.strong_slot)
    words: list[str] = []
    for w in (prompt.topic, prompt.aspect):
        if rng.random() < spec.p_basic:
            words.append(w)
    words += [w for w in prompt.decoys if rng.random() < spec.p_decoy]
    adv_in = [j for j in range(c.n_advanced) if rng.random() < (spec.p_adv_strong if j in strong_adv else spec.p_adv_weak)]
    exc_in = [j for j in range(c.n_excellent) if rng.random() < (spec.p_exc_strong if j in strong_exc else spec.p_exc_weak)]
    if spec.ordered_excellent:
        adv_in = sorted(set(adv_in) | set(exc_in))  # meeting excellent j needs advanced word j
    words += [prompt.advanced[j] for j in adv_in] + [prompt.excellent[j] for j in exc_in]
    lo, hi = spec.n_filler
    words += [str(x) for x in rng.choice(world.filler_words, size=int(rng.integers(lo, hi + 1)))]
    words += [s for s in world.signature_words if rng.random() < spec.p_signature_filler]
    weight = c.n_advanced * c.advanced_weight + c.n_excellent * c.excellent_weight
    quality = (len(adv_in) * c.advanced_weight + len(exc_in) * c.excellent_weight) / weight if weight else 0.0
    if spec.signature:
        words += [spec.signature] * int(rng.binomial(2, min(1.0, spec.artifact_strength * quality)))
    words += [str(x) for x in rng.choice(world.filler_words, size=int(round(spec.verbosity * quality * 3)))]
    order = rng.permutation(len(words))
    words = [words[i] for i in order]
    if spec.ordered_excellent:
        for j in exc_in:  # put advanced word j before excellent word j
            ia, ie = words.index(prompt.advanced[j]), words.index(prompt.excellent[j])
            if ia > ie:
                words[ia], words[ie] = words[ie], words[ia]
    return " ".join(words)


def sample_responses(
    world: World, spec: GeneratorSpec, prompt: SimPrompt, n: int, seed: int | tuple[int, ...]
) -> list[str]:
    """`n` responses, deterministic given (world seed, generator, prompt, seed)."""
    key = [world.config.seed, 3, zlib.crc32(spec.name.encode()), int(prompt.id[1:])]
    key += list(seed) if isinstance(seed, tuple) else [seed]
    rng = np.random.default_rng(key)
    return [generate(world, spec, prompt, rng) for _ in range(n)]
