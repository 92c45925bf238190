"""Proposer / Verifier protocols: the RTD algorithm is written once against these.

LLM-backed implementations (rubrax.elicit.llm) call an OpenAI-compatible endpoint;
the synthetic testbed (rubrax.sim) provides simulated ones. All methods are async so
that an LLM-backed implementation can run many calls concurrently; a simulated one
simply returns.

Failure is a value: `refine` returns None when the proposer failed (the caller
keeps the previous rubric); `grade` returns "unknown" for criteria it could not
decide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from rubrax.rubric import Criterion, Rubric, Verdict


@runtime_checkable
class Proposer(Protocol):
    async def propose(self, prompt_id: str, prompt: str) -> Sequence[Criterion] | None:
        """Initial rubric from the prompt alone (None on failure)."""
        ...

    async def refine(self, rubric: Rubric, response_a: str, response_b: str) -> Sequence[Criterion] | None:
        """Refinement through differentiation: a full revised list of criteria (None on failure)."""
        ...


@runtime_checkable
class Verifier(Protocol):
    async def grade(self, rubric: Rubric, response: str) -> Mapping[str, Verdict]:
        """One verdict per criterion id of `rubric` (missing ids count as unknown)."""
        ...
