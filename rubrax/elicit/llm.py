"""LLM-backed Proposer, Verifier and pairwise Judge over a `ChatClient`.

Prompt templates are package data (rubrax/elicit/templates/*.txt, our own wording) and
can be overridden file by file with `Templates.load(directory)`. A template file has a
`### system` and a `### user` section; `$name` placeholders are filled with
`string.Template` (so JSON braces in the text need no escaping; write `$$` for a literal
dollar sign).

Untrusted text (prompts, responses, criterion texts) is fenced between tags; any tag
that could close or open a fence inside it is neutralised (`<` -> `&lt;`), and criterion
texts are flattened to one line, so a response cannot forge a criterion or its id.
Verdicts are read only for the ids that were asked.

JSON output is requested (`response_format`) where the server supports it; the parsers
are tolerant: code fences, prose around the JSON, and truncated JSON (whatever complete
`"id": "yes|no"` pairs it holds are kept; the rest are unknown).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
import os
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from rubrax.elicit.client import ChatClient, ChatError
from rubrax.rewards.rubric import Criterion, Rubric, with_ids

TEMPLATE_NAMES = ("propose", "refine", "verify_all", "verify_one", "judge")
_FENCE_TAGS = re.compile(r"<(/?)(prompt|rubric|criteria|criterion|response(?:_a|_b|_1|_2)?)\b", re.I)


# --------------------------------------------------------------------------- templates


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str

    @classmethod
    def parse(cls, name: str, text: str) -> "Template":
        m = re.fullmatch(r"\s*### system\n(.*?)\n### user\n(.*?)\s*", text, re.S)
        if m is None:
            raise ValueError(f"template {name!r}: expected a '### system' section then a '### user' section")
        return cls(name, m.group(1).strip(), m.group(2).strip())

    def render(self, **values: str) -> list[dict[str, str]]:
        try:
            return [
                {"role": "system", "content": string.Template(self.system).substitute(values)},
                {"role": "user", "content": string.Template(self.user).substitute(values)},
            ]
        except KeyError as err:
            raise ValueError(f"template {self.name!r} uses ${err.args[0]}, which is not provided") from None


@dataclasses.dataclass(frozen=True)
class Templates:
    propose: Template
    refine: Template
    verify_all: Template
    verify_one: Template
    judge: Template

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None) -> "Templates":
        """The package templates, with any `<name>.txt` found in `directory` taking precedence."""
        out = {}
        for name in TEMPLATE_NAMES:
            path = os.path.join(directory, f"{name}.txt") if directory else None
            if path and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            else:
                text = importlib.resources.files("rubrax.elicit").joinpath("templates", f"{name}.txt").read_text(encoding="utf-8")
            out[name] = Template.parse(name, text)
        return cls(**out)


def fence(text: str) -> str:
    """Neutralises tags that could close or open a fence inside untrusted text."""
    return _FENCE_TAGS.sub(lambda m: f"&lt;{m.group(1)}{m.group(2)}", text)


def _one_line(text: str) -> str:
    return fence(" ".join(text.split()))


def format_criteria(rubric: Rubric, *, weights: bool) -> str:
    if weights:
        return "\n".join(f"[{c.id}] (weight {c.weight:g}) {_one_line(c.text)}" for c in rubric.criteria)
    return "\n".join(f"[{c.id}] {_one_line(c.text)}" for c in rubric.criteria)


# --------------------------------------------------------------------------- tolerant parsing


def _json_string_prefix(text: str, start: int) -> str:
    """The decoded content of the JSON string literal opening at text[start] (a '"'),
    up to its closing quote or, when the text was cut inside it, as far as it goes."""
    i, n = start + 1, len(text)
    while i < n and text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    raw = text[start + 1 : min(i, n)]
    raw = re.sub(r"\\(u[0-9a-fA-F]{0,3})?$", "", raw)  # a dangling escape cut at the end
    try:
        return json.loads('"' + raw + '"')
    except json.JSONDecodeError:
        return raw


def unwrap_json_string(text: str, *, any_text: bool = False, keep_keys: Sequence[str] = ()) -> str:
    """The inner text when `text` is a JSON object whose only value is a string holding
    JSON (some servers answer JSON mode as {"response": "<the model's JSON text>"});
    else `text` unchanged. A wrapper cut short (finish_reason=length) is unwrapped too.
    `any_text`: unwrap whatever the string holds (prose, lists), unless the key is one of
    `keep_keys` (a real answer such as {"c1": "yes"})."""
    m = re.match(r'\s*\{\s*"([^"\\]{1,64})"\s*:\s*(?=")', text)
    if m is None or m.group(1) in keep_keys:
        return text
    inner = _json_string_prefix(text, m.end())
    rest = text[m.end() :]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, Mapping) and len(obj) != 1:
        return text  # a real object with several fields, not a wrapper
    if obj is None and re.search(r'^"(?:[^"\\]|\\.)*"\s*,', rest, re.S):
        return text  # a string value followed by more fields: not a wrapper
    return inner if any_text or re.match(r"\s*(```(?:json)?\s*)?[{\[]", inner) else text


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text` (code fences, prose, and a
    {"key": "<JSON text>"} wrapper allowed); None if none."""
    stripped = unwrap_json_string(text).strip()
    fenced = re.search(r"```(?:json)?\s*\n?(.*?)```", stripped, re.S)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[{\[]", stripped):
        try:
            obj, _ = decoder.raw_decode(stripped, m.start())
            return obj
        except json.JSONDecodeError:
            continue
    return None


_YES = {"yes", "y", "true", "met", "pass", "1"}
_NO = {"no", "n", "false", "not met", "unmet", "fail", "0"}
_VERDICT_WORDS = re.compile(r"\b(not met|unmet|yes|no|true|false|met|pass|fail)\b", re.I)
# A verdict line: an id marker ("c1:", "[c1]", "1.", "1)", "- c2 -", "**c3**:") then the rest.
_VERDICT_LINE = re.compile(
    r"^\s*(?:[-*]\s+)?\**\s*(?:[\[(]\s*([A-Za-z]?[\w-]{1,16})\s*[\])]\s*\**\s*[:.=-]?|([A-Za-z]?[\w-]{1,16})\s*\**\s*[:.)=-])\s*(.*)$"
)


def _verdict(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        for k in ("verdict", "answer", "met", "result"):
            if k in value:
                return _verdict(value[k])
        return "unknown"
    if isinstance(value, (int, str)):
        v = str(value).strip().strip(".").lower()
        return "yes" if v in _YES else "no" if v in _NO else "unknown"
    return "unknown"


def _line_verdict(text: str) -> str:
    """yes/no when every verdict word of `text` agrees (one "yes" and one "no" is ambiguous)."""
    found = {_verdict(w.lower()) for w in _VERDICT_WORDS.findall(text)}
    return found.pop() if len(found) == 1 else "unknown"


def _line_id(token: str, ids: Sequence[str]) -> str | None:
    """The asked id a line marker names: the id itself, or a list number n that means the
    same id read either way (id "c<n>" and the n-th id asked); None when it is ambiguous."""
    if token in ids:
        return token
    if not token.isdigit():
        return None
    n = int(token)
    named = {f"c{n}"} & set(ids)
    positional = {ids[n - 1]} if 1 <= n <= len(ids) else set()
    both = named | positional
    return both.pop() if len(both) == 1 else None


def parse_verdict_lines(text: str, ids: Sequence[str]) -> dict[str, str]:
    """Verdicts from a reply written as lines (`c1: yes`, `1. yes`, `[c2] no - because ...`).
    An id given two different verdicts, or a line with both "yes" and "no", stays unknown."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _VERDICT_LINE.match(line)
        token = (m.group(1) or m.group(2)) if m else ""
        cid = _line_id(token.lower() if re.fullmatch(r"[cC]\d+", token) else token, ids) if m else None
        if cid is None:
            continue
        v = _line_verdict(m.group(3))
        if cid in out and out[cid] != v:
            v = "unknown"
        out[cid] = v
    return out


def parse_verdicts(text: str, ids: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """{id: yes|no|unknown} for the ids asked, from a verifier reply; plus the problems seen."""
    problems = []
    text = unwrap_json_string(text, any_text=True, keep_keys=("verdicts", *ids))
    obj = extract_json(text)
    out = {cid: "unknown" for cid in ids}
    if isinstance(obj, Mapping):
        if isinstance(obj.get("verdicts"), Mapping):
            obj = obj["verdicts"]
        for cid in ids:
            if cid in obj:
                out[cid] = _verdict(obj[cid])
        extra = sorted(str(k) for k in obj if k not in out)
        if extra:
            problems.append(f"unexpected criterion ids {extra[:5]}")
    else:
        # Truncated or broken JSON: salvage the complete "id": "yes|no" pairs; else lines.
        problems.append("reply is not a JSON object")
        for cid in ids:
            m = re.search(r'"' + re.escape(cid) + r'"\s*:\s*"?(yes|no|true|false)\b', text, re.I)
            if m:
                out[cid] = _verdict(m.group(1))
        if all(v == "unknown" for v in out.values()):
            out.update(parse_verdict_lines(text, ids))
    bad = [cid for cid, v in out.items() if v == "unknown"]
    if bad:
        problems.append(f"no verdict for {len(bad)} of {len(ids)} criteria")
    return out, problems


def parse_single_verdict(text: str) -> str:
    text = unwrap_json_string(text, any_text=True, keep_keys=("verdict", "answer", "met", "result"))
    obj = extract_json(text)
    if isinstance(obj, Mapping):
        return _verdict(obj)
    m = re.search(r'"verdict"\s*:\s*"?(yes|no)\b', text, re.I)
    if m:
        return m.group(1).lower()
    v = _verdict(text)
    if v == "unknown":
        # "Yes, the response ..." / "No. It never ...": a verdict word first, none contradicting it.
        first = re.match(r"\s*\**\s*(yes|no)\b", text, re.I)
        if first and _line_verdict(text) == first.group(1).lower():
            v = first.group(1).lower()
    return v


def _criteria_items(text: str) -> tuple[list[Any] | None, bool]:
    """(the list of criterion objects, truncated?) of a proposer reply. A reply cut short
    keeps the complete objects before the cut."""
    obj = extract_json(text)
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in ("criteria", "rubric", "rubrics") if isinstance(obj.get(k), list)), None)
    if isinstance(obj, list):
        return obj, False
    inner = unwrap_json_string(text)
    m = re.search(r'"(?:criteria|rubric|rubrics)"\s*:\s*\[', inner) or re.search(r"\[\s*(?=\{)", inner)
    if m is None:
        return None, False
    decoder, pos, items = json.JSONDecoder(), m.end(), []
    while True:
        pos = re.compile(r"[\s,]*").match(inner, pos).end()
        try:
            item, pos = decoder.raw_decode(inner, pos)
        except json.JSONDecodeError:
            break
        items.append(item)
    return (items, True) if items else (None, False)


def parse_criteria(text: str) -> tuple[list[tuple[str, float]], list[str]]:
    """[(criterion text, weight)] from a proposer reply, weights rounded and clipped to 1..3.

    Tolerated, each noted in the problems: a reply cut short (the complete criteria before
    the cut are kept), exact duplicate criteria (dropped), a criterion without a weight
    (weight 1, the lowest: a missing weight never makes a criterion count more).
    """
    obj, truncated = _criteria_items(text)
    if obj is None:
        return [], ["reply holds no list of criteria"]
    problems = [f"reply truncated: kept the {len(obj)} complete criteria before the cut"] if truncated else []
    out, seen = [], set()
    for i, item in enumerate(obj):
        if not isinstance(item, Mapping):
            problems.append(f"item {i} is not an object")
            continue
        crit = next((item[k] for k in ("criterion", "text", "description") if isinstance(item.get(k), str)), "")
        if not crit.strip():
            problems.append(f"item {i} has no criterion text")
            continue
        if "weight" not in item and "points" not in item:
            problems.append(f"item {i} has no weight; using 1")
        w = item.get("weight", item.get("points", 1))
        try:
            w = float(w)
        except (TypeError, ValueError):
            problems.append(f"item {i} has a non-numeric weight {w!r}; using 1")
            w = 1.0
        if not math.isfinite(w):
            w = 1.0
        w_clipped = float(min(3, max(1, round(w))))
        if w_clipped != w:
            problems.append(f"item {i} weight {w:g} set to {w_clipped:g}")
        text_i = " ".join(crit.split())
        if text_i in seen:
            problems.append(f"item {i} duplicates an earlier criterion; dropped")
            continue
        seen.add(text_i)
        out.append((text_i, w_clipped))
    return out, problems


# "Response 1 is better", "I prefer response 2", "Winner: Response 1", "**Response 2** wins".
_WINNER_PATTERNS = (
    re.compile(r"\bresponse[\s_]*\**\s*([12])\b\**\s+(?:is\s+(?:clearly\s+|slightly\s+|much\s+)?(?:the\s+)?better|wins|is\s+(?:the\s+)?winner|is\s+preferred)", re.I),
    re.compile(r"\b(?:winner|better(?:\s+response)?|preferred(?:\s+response)?|verdict|answer)\s*(?:is|:|=)\s*\**\s*(?:response[\s_]*)?\**\s*([12])\b", re.I),
    re.compile(r"\bprefer\s+(?:the\s+)?response[\s_]*\**\s*([12])\b", re.I),
)


def parse_winner(text: str) -> int | None:
    """1 or 2 from a judge reply: JSON {"winner": 1} (or "Response 1"), else prose that names
    one response as the better; None when nothing or both are named."""
    text = unwrap_json_string(text, any_text=True, keep_keys=("winner", "better"))
    obj = extract_json(text)
    if isinstance(obj, Mapping):
        obj = obj.get("winner", obj.get("better"))
    if isinstance(obj, (int, str)) and not isinstance(obj, bool):
        m = re.fullmatch(r"\s*(?:response[\s_]*)?([12])\s*", str(obj), re.I)
        if m:
            return int(m.group(1))
    m = re.search(r'winner"?\s*[:=]\s*"?([12])\b', text)
    if m:
        return int(m.group(1))
    named = {int(g) for p in _WINNER_PATTERNS for g in p.findall(text)}
    return named.pop() if len(named) == 1 else None


# --------------------------------------------------------------------------- proposer


class LLMProposer:
    """Writes initial rubrics from the prompt and revises them from a pair of responses.

    Returns None (the protocol's failure value) when the call failed or the reply held no
    usable criterion; the reason is appended to `self.failures` as (prompt_id, reason).
    """

    def __init__(self, client: ChatClient, *, templates: Templates | None = None, temperature: float = 0.0, max_tokens: int | None = None, min_criteria: int = 5, max_criteria: int = 20):
        self.client = client
        self.templates = templates or Templates.load()
        self.temperature, self.max_tokens = temperature, max_tokens
        self.min_criteria, self.max_criteria = min_criteria, max_criteria
        self.failures: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []

    async def _criteria(self, prompt_id: str, messages: list[dict[str, str]]) -> list[Criterion] | None:
        try:
            reply = await self.client.chat_detailed(messages, json_output=True, temperature=self.temperature, max_tokens=self.max_tokens)
        except ChatError as err:
            self.failures.append((prompt_id, str(err)))
            return None
        items, problems = parse_criteria(reply.content)
        if reply.finish_reason == "length":
            problems.insert(0, "finish_reason=length (the reply was cut at max_tokens)")
        if not items:
            self.failures.append((prompt_id, "; ".join(problems)))
            return None
        if problems:
            self.warnings.append((prompt_id, "; ".join(problems)))
        return list(with_ids(items))

    async def propose(self, prompt_id: str, prompt: str) -> list[Criterion] | None:
        messages = self.templates.propose.render(prompt=fence(prompt), min_criteria=str(self.min_criteria), max_criteria=str(self.max_criteria))
        return await self._criteria(prompt_id, messages)

    async def refine(self, rubric: Rubric, response_a: str, response_b: str) -> list[Criterion] | None:
        messages = self.templates.refine.render(
            prompt=fence(rubric.prompt), rubric=format_criteria(rubric, weights=True), response_a=fence(response_a), response_b=fence(response_b)
        )
        return await self._criteria(rubric.prompt_id, messages)


# --------------------------------------------------------------------------- verifier


@dataclasses.dataclass(frozen=True)
class Grading:
    """Verdicts for every criterion of a rubric, and what went wrong (empty when nothing)."""

    verdicts: dict[str, str]
    failures: tuple[str, ...] = ()


class LLMVerifier:
    """Grades a response against a rubric: `mode="all"` asks about all criteria in one call
    (reply {id: yes|no}); `mode="per_criterion"` makes one call per criterion (HealthBench
    style, reply {"verdict": yes|no}). A failed call gives "unknown" verdicts and a failure.

    `grade_detailed(..., sample=i)` with i > 0 adds `seed=i` to the request so that k
    gradings of one response are k distinct calls (use a temperature > 0 for votes).
    """

    MODES = ("all", "per_criterion")

    def __init__(self, client: ChatClient, *, mode: str = "all", templates: Templates | None = None, temperature: float = 0.0, max_tokens: int | None = None):
        if mode not in self.MODES:
            raise ValueError(f"LLMVerifier: mode must be one of {self.MODES}, got {mode!r}")
        self.client = client
        self.mode = mode
        self.templates = templates or Templates.load()
        self.temperature, self.max_tokens = temperature, max_tokens

    async def aclose(self) -> None:
        await self.client.aclose()

    def _sampling(self, sample: int) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": sample if sample else None}

    async def grade(self, rubric: Rubric, response: str) -> dict[str, str]:
        return (await self.grade_detailed(rubric, response)).verdicts

    async def grade_detailed(self, rubric: Rubric, response: str, *, sample: int = 0) -> Grading:
        if self.mode == "all":
            return await self._grade_all(rubric, response, sample)
        return await self._grade_each(rubric, response, sample)

    async def _grade_all(self, rubric: Rubric, response: str, sample: int) -> Grading:
        messages = self.templates.verify_all.render(prompt=fence(rubric.prompt), criteria=format_criteria(rubric, weights=False), response=fence(response))
        try:
            reply = await self.client.chat(messages, json_output=True, **self._sampling(sample))
        except ChatError as err:
            return Grading({cid: "unknown" for cid in rubric.ids()}, (str(err),))
        verdicts, problems = parse_verdicts(reply, rubric.ids())
        return Grading(verdicts, tuple(problems))

    async def _one(self, rubric: Rubric, c: Criterion, response: str, sample: int) -> tuple[str, str | None]:
        messages = self.templates.verify_one.render(prompt=fence(rubric.prompt), criterion=_one_line(c.text), response=fence(response))
        try:
            reply = await self.client.chat(messages, json_output=True, **self._sampling(sample))
        except ChatError as err:
            return "unknown", f"{c.id}: {err}"
        v = parse_single_verdict(reply)
        return v, None if v != "unknown" else f"{c.id}: unparsable verdict"

    async def _grade_each(self, rubric: Rubric, response: str, sample: int) -> Grading:
        import asyncio

        results = await asyncio.gather(*(self._one(rubric, c, response, sample) for c in rubric.criteria))
        verdicts = {c.id: v for c, (v, _) in zip(rubric.criteria, results)}
        return Grading(verdicts, tuple(f for _, f in results if f))


# --------------------------------------------------------------------------- judge


class LLMJudge:
    """Pairwise judge: which of two responses is better. The display order is randomised
    per item by a seeded hash of (seed, item key), so that a rerun sends the same requests
    (cache hits) while position bias averages out over items."""

    def __init__(self, client: ChatClient, *, templates: Templates | None = None, temperature: float = 0.0, max_tokens: int | None = None, seed: int = 0):
        self.client = client
        self.templates = templates or Templates.load()
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed

    def swapped(self, key: str) -> bool:
        return hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[0] % 2 == 1

    async def compare(self, prompt: str, response_a: str, response_b: str, *, key: str, swap: bool | None = None) -> str | None:
        """"a" or "b" (the better one), or None when the judge failed.

        `swap` forces the display order (True: b is shown first); None draws it from `key`.
        """
        swap = self.swapped(key) if swap is None else swap
        first, second = (response_b, response_a) if swap else (response_a, response_b)
        messages = self.templates.judge.render(prompt=fence(prompt), response_1=fence(first), response_2=fence(second))
        try:
            reply = await self.client.chat(messages, json_output=True, temperature=self.temperature, max_tokens=self.max_tokens)
        except ChatError:
            return None
        winner = parse_winner(reply)
        if winner is None:
            return None
        return ("b" if winner == 1 else "a") if swap else ("a" if winner == 1 else "b")
