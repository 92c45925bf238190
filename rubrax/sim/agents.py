"""Simulated proposer and verifier: the tail world's stand-ins for GPT-4.1 / 4.1-mini.

They implement rubrax.elicit.protocols.Proposer / Verifier, so rubrax.elicit.rtd
(initial proposal, refinement, iterative RTD) runs on them unchanged. Criteria are
written in the predicate language of rubrax.sim.predicates.

SimProposer
* ``propose`` (prompt alone): knows only what the prompt reveals -- "mentions
  <topic>", "mentions <aspect>" (weight 3) -- general writing norms any proposer
  states without seeing a response ("repeats no word more than 2 times", weight 1;
  ``max_repeat_norm``, 0 = off), plus plausible but wrong guesses: it asks for the
  prompt's decoy words (weight 2) and guesses a length range (``guess_length``,
  default 8..24 words: partly wrong, since gold wants <= max_len).
  It cannot name hidden advanced or excellent requirements.
* ``refine`` (a pair): judges which response is better with its own noise
  (P(a better) = sigmoid((r*(a) - r*(b)) / judge_temperature)); then for every word
  the better response has and the worse lacks:
    - advanced word -> "mentions w" (weight 2);
    - excellent word -> "mentions <adv> before w" (weight 3) when the better
      response has that ordered pair, else "mentions w" (weight 2);
    - a signature word, decoy or unfamiliar content word is superficial, but with
      probability ``p_superficial`` the proposer takes it for substance and adds
      "mentions w" (weight 1); function words ("the", "so", ...) never fool it
      (no LLM writes 'mentions "the"');
  a length gap of >= 3 words is likewise taken for substance with probability
  ``p_superficial`` (the length criterion becomes "between len(better) and 24").
  Substantive content both responses share is added with probability
  ``p_notice_shared`` (rewrites also decompose what is already good).
  Criteria of superficial words that the better response fails are deleted with
  probability 1 - p_superficial. A word the worse response repeats >= 3 times
  (and the better does not) becomes a pitfall "mentions w between 0 and 2 times".
  With probability ``p_fail`` the call fails (returns None), like a malformed
  LLM answer, and RTD keeps the previous rubric.
SimVerifier
* checks each criterion's predicate exactly, then flips the verdict with
  probability ``error_rate``; unparseable text gets "unknown";
* reads the response as a whole, as an LLM grader does: a degenerate response
  (more than ``degenerate_repetition`` of its words are repeats) earns "no" on every
  criterion -- "daka daka puno daka" does not *explain* daka, whatever its words.
  Between the gold penalty's onset (repetition_free=0.25) and this threshold the
  verifier still credits criteria: a deliberate, exploitable gap.

Randomness is a pure function of (seed, inputs): the same call gives the same
answer, whatever the order of concurrent calls, as an LLM at temperature 0 would.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from rubrax.rubric import Criterion, Rubric, Verdict
from rubrax.sim.predicates import Predicate, parse_predicate
from rubrax.sim.world import PROMPT_VERB, World, sigmoid, words_of


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProposerConfig:
    """Simulated proposer. Defaults and why:

    judge_temperature=0.05: as good a judge as the gold one (GPT-4.1 proposes and judges).
    p_superficial=0.3: a strong LLM still reads style as substance now and then.
    p_notice_shared=0.25: rewrites sometimes add criteria for content both responses share.
    p_fail=0.05: occasional malformed answers exercise RTD's keep-on-failure path.
    guess_length=(8, 24): a plausible, wrong length guess (gold caps at max_len=18).
    max_repeat_norm=2: the general "do not repeat yourself" norm an LLM proposer writes
      from the prompt alone (LLM rubrics routinely carry clarity/coherence criteria);
      without it a predicate verifier would credit "topic topic topic ..." fully.
    """

    seed: int = 0
    judge_temperature: float = 0.05
    p_superficial: float = 0.3
    p_notice_shared: float = 0.25
    p_fail: float = 0.05
    guess_length: tuple[int, int] = (8, 24)
    max_repeat_norm: int = 2

    def __post_init__(self) -> None:
        if self.max_repeat_norm < 0:
            raise ValueError(f"ProposerConfig.max_repeat_norm must be >= 0 (0 = off), got {self.max_repeat_norm}")
        if not self.judge_temperature > 0:
            raise ValueError(f"ProposerConfig.judge_temperature must be > 0, got {self.judge_temperature}")
        for name in ("p_superficial", "p_notice_shared", "p_fail"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ProposerConfig.{name} must be a probability in [0, 1], got {v}")
        lo, hi = self.guess_length
        if not 0 <= lo <= hi:
            raise ValueError(f"ProposerConfig.guess_length must be 0 <= lo <= hi, got {self.guess_length}")


class SimProposer:
    """Implements rubrax.elicit.protocols.Proposer over a tail world."""

    def __init__(self, world: World, config: ProposerConfig | None = None):
        self.world = world
        self.config = config or ProposerConfig()
        self.calls = 0

    def _prompt_id(self, prompt_id: str, prompt: str) -> str:
        try:
            self.world.prompt(prompt_id)
            return prompt_id
        except KeyError:
            for p in self.world.prompts:
                if p.text == prompt.strip():
                    return p.id
            raise

    async def propose(self, prompt_id: str, prompt: str) -> Sequence[Criterion] | None:
        self.calls += 1
        pid = self._prompt_id(prompt_id, prompt)
        p = self.world.prompt(pid)
        revealed = [w for w in words_of(prompt) if w != PROMPT_VERB]
        preds: list[tuple[Predicate, float]] = [(Predicate("contains", a=w), 3.0) for w in revealed]
        preds += [(Predicate("contains", a=w), 2.0) for w in p.decoys]
        lo, hi = self.config.guess_length
        preds.append((Predicate("length", lo=lo, hi=hi), 1.0))
        if self.config.max_repeat_norm:
            preds.append((Predicate("max_repeat", hi=self.config.max_repeat_norm), 1.0))
        return [Criterion(id=f"c{i + 1}", text=pr.text, weight=w) for i, (pr, w) in enumerate(preds)]

    async def refine(self, rubric: Rubric, response_a: str, response_b: str) -> Sequence[Criterion] | None:
        self.calls += 1
        cfg, world = self.config, self.world
        pid = self._prompt_id(rubric.prompt_id, rubric.prompt)
        rng = _rng(cfg.seed, "refine", pid, tuple((c.id, c.text, c.weight) for c in rubric.criteria), response_a, response_b)
        if rng.random() < cfg.p_fail:
            return None
        d = world.gold_reward(pid, response_a) - world.gold_reward(pid, response_b)
        a_better = rng.random() < sigmoid(d / cfg.judge_temperature)
        better, worse = (response_a, response_b) if a_better else (response_b, response_a)
        wb, ww = words_of(better), words_of(worse)
        p = world.prompt(pid)

        criteria: list[Criterion] = []
        texts: set[str] = set()
        for c in rubric.criteria:
            pred = parse_predicate(c.text)
            if pred is not None and pred.kind == "contains" and not pred.check(wb):
                if world.word_role(pid, pred.a) not in ("basic", "advanced", "excellent"):
                    if rng.random() >= cfg.p_superficial:
                        continue  # the best response does without it: delete
            criteria.append(c)
            texts.add(c.text)
        next_id = 1 + max((int(c.id[1:]) for c in criteria if c.id[1:].isdigit() and c.id[0] == "c"), default=0)

        def add(pred: Predicate, weight: float) -> None:
            nonlocal next_id
            if pred.text in texts:
                return
            if pred.kind == "length":  # one length criterion: a new one replaces the old
                criteria[:] = [c for c in criteria if (q := parse_predicate(c.text)) is None or q.kind != "length"]
            criteria.append(Criterion(id=f"c{next_id}", text=pred.text, weight=weight))
            texts.add(pred.text)
            next_id += 1

        def substantive(w: str, shared: bool) -> None:
            role = world.word_role(pid, w)
            if role == "advanced":
                add(Predicate("contains", a=w), 2.0)
            elif role == "excellent":
                j = p.excellent.index(w)
                pair = Predicate("order", a=p.advanced[j], b=w)
                add(pair, 3.0) if pair.check(wb) else add(Predicate("contains", a=w), 2.0)
            elif not shared and role not in ("basic", "filler") and rng.random() < cfg.p_superficial:
                add(Predicate("contains", a=w), 1.0)

        set_w = set(ww)
        for w in sorted(set(wb) - set_w):
            substantive(w, shared=False)
        for w in sorted(set(wb) & set_w):
            if rng.random() < cfg.p_notice_shared:
                substantive(w, shared=True)
        if len(wb) - len(ww) >= 3 and rng.random() < cfg.p_superficial:
            add(Predicate("length", lo=len(wb), hi=max(len(wb), 24)), 1.0)
        for w in sorted(set_w):
            if ww.count(w) >= 3 and wb.count(w) <= 1:
                add(Predicate("count", a=w, lo=0, hi=2), 1.0)
        return criteria


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifierConfig:
    """Simulated verifier.

    error_rate=0.05: GPT-4.1-mini misgrades a simple check now and then.
    degenerate_repetition=0.4: above this fraction of repeated words a response is word
      salad to a reading grader (1.0 = never; the predicates alone then decide).
    """

    seed: int = 0
    error_rate: float = 0.05
    degenerate_repetition: float = 0.4

    def __post_init__(self) -> None:
        for name in ("error_rate", "degenerate_repetition"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"VerifierConfig.{name} must be a probability in [0, 1], got {v}")


class SimVerifier:
    """Implements rubrax.elicit.protocols.Verifier: exact predicate checks, flipped at error_rate."""

    def __init__(self, config: VerifierConfig | None = None):
        self.config = config or VerifierConfig()
        self.calls = 0

    def grade_sync(self, rubric: Rubric, response: str) -> dict[str, Verdict]:
        self.calls += 1
        words = words_of(response)
        degenerate = bool(words) and 1.0 - len(set(words)) / len(words) > self.config.degenerate_repetition
        out: dict[str, Verdict] = {}
        for c in rubric.criteria:
            pred = parse_predicate(c.text)
            if pred is None:
                out[c.id] = "unknown"
                continue
            truth = pred.check(words) and not degenerate
            if self.config.error_rate > 0 and _rng(self.config.seed, "grade", c.text, response).random() < self.config.error_rate:
                truth = not truth
            out[c.id] = "yes" if truth else "no"
        return out

    async def grade(self, rubric: Rubric, response: str) -> Mapping[str, Verdict]:
        return self.grade_sync(rubric, response)

