"""Rubric, prompt and response files: JSONL, the `JunkaiZ/Rubrics` and HealthBench schemas.

Record shapes read here (one JSON object per line):

- rubrax rubrics:  {prompt_id, prompt, rubrics: [{criterion, weight, id?, tags?}], weight_scale?}
  Ids c1..cN are assigned when absent (all given or none).
- JunkaiZ/Rubrics (the paper's release): {prompt, rubrics: [{criterion, weight}],
  number_of_criteria, total_weight}; no prompt id, so one is derived from the prompt text
  ("p-" + the first 12 hex digits of its SHA-1) unless `prompt_id` / `id` is present.
- HealthBench: {prompt_id, prompt: [{role, content}, ...], rubrics: [{criterion, points, tags}]};
  the conversation is rendered to text with `render_messages`; points are signed
  (negative = pitfall).
- responses to grade: {prompt_id, response_id, prompt, response, source_model?}.
- prompts to propose rubrics for: {prompt_id, prompt}.

Weights are validated on load: scale "paper" accepts 1 <= w <= 3 (the paper's weights),
scale "points" any finite non-zero number (HealthBench). Every error names the file, the
line (or dataset row) and the field: `data.jsonl:7: field 'rubrics[2].weight': ...`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from rubrax.data import records
from rubrax.data.records import RecordError, write_jsonl
from rubrax.rubric import Criterion, Rubric

SCHEMAS = ("auto", "rubrax", "junkaiz", "healthbench")
SCALES = ("paper", "points")


class RubricFormatError(RecordError):
    """Bad rubric/response record: names the source (file or dataset), the line/row and the field."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line: `rubrax.data.records.iter_jsonl` (the one
    JSONL reader) with its errors as RubricFormatError, in the (line, record) form."""
    for _, line, rec in records.iter_jsonl(path, error=RubricFormatError):
        yield line, rec


# --------------------------------------------------------------------------- field helpers


def render_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    """A chat conversation as text: a single user turn is its content; several turns
    are "role: content" blocks separated by blank lines."""
    if len(messages) == 1 and messages[0].get("role", "user") == "user":
        return str(messages[0]["content"])
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _text(rec: Mapping[str, Any], key: str, src: str, line: int | None, *, field: str | None = None, allow_empty: bool = False) -> str:
    field = field or key
    if key not in rec or rec[key] is None:
        raise RubricFormatError(src, line, field, "missing")
    value = rec[key]
    if not isinstance(value, str):
        raise RubricFormatError(src, line, field, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RubricFormatError(src, line, field, "must not be empty")
    return value


def _id(rec: Mapping[str, Any], key: str, src: str, line: int | None) -> str:
    if key not in rec or rec[key] is None:
        raise RubricFormatError(src, line, key, "missing")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise RubricFormatError(src, line, key, f"must be a non-empty string or integer, got {value!r}")
    return str(value)


def _prompt(rec: Mapping[str, Any], src: str, line: int | None) -> str:
    if isinstance(rec.get("prompt"), list):
        msgs = rec["prompt"]
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                raise RubricFormatError(src, line, f"prompt[{i}]", "chat messages need string 'role' and 'content'")
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise RubricFormatError(src, line, "prompt", "must not be empty")
        return render_messages(msgs)
    return _text(rec, "prompt", src, line)


def derived_prompt_id(prompt: str) -> str:
    return "p-" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def _weight(value: Any, scale: str, src: str, line: int | None, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RubricFormatError(src, line, field, f"must be a number, got {value!r}")
    w = float(value)
    if not math.isfinite(w) or w == 0.0:
        raise RubricFormatError(src, line, field, f"must be finite and non-zero, got {value!r}")
    if scale == "paper" and not 1.0 <= w <= 3.0:
        raise RubricFormatError(src, line, field, f"must be in 1..3 (the paper's scale; use weight scale 'points' for signed points), got {value!r}")
    return w


# --------------------------------------------------------------------------- rubrics


def detect_schema(rec: Mapping[str, Any]) -> str:
    items = rec.get("rubrics")
    if isinstance(rec.get("prompt"), list) or (isinstance(items, list) and any(isinstance(i, Mapping) and "points" in i for i in items)):
        return "healthbench"
    if "prompt_id" not in rec and ("number_of_criteria" in rec or "total_weight" in rec):
        return "junkaiz"
    return "rubrax"


def parse_rubric(rec: Mapping[str, Any], *, source: str = "<record>", line: int | None = None, schema: str = "auto", scale: str | None = None) -> Rubric:
    """One record (any supported schema) -> a validated `Rubric`."""
    src = source
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    if schema == "auto":
        schema = detect_schema(rec)
    if scale is None:
        scale = rec.get("weight_scale") or ("points" if schema == "healthbench" else "paper")
    if scale not in SCALES:
        raise RubricFormatError(src, line, "weight_scale", f"must be one of {SCALES}, got {scale!r}")
    prompt = _prompt(rec, src, line)
    if "prompt_id" in rec:
        prompt_id = _id(rec, "prompt_id", src, line)
    elif "id" in rec:
        prompt_id = _id(rec, "id", src, line)
    else:
        prompt_id = derived_prompt_id(prompt)
    items = rec.get("rubrics")
    if items is None:
        raise RubricFormatError(src, line, "rubrics", "missing")
    if not isinstance(items, list) or not items:
        raise RubricFormatError(src, line, "rubrics", "must be a non-empty list of criteria")
    has_ids = [isinstance(i, Mapping) and i.get("id") is not None for i in items]
    if any(has_ids) and not all(has_ids):
        missing = has_ids.index(False)
        raise RubricFormatError(src, line, f"rubrics[{missing}].id", "give ids for all criteria or for none")
    criteria, seen = [], {}
    wkey = "points" if schema == "healthbench" else "weight"
    for i, item in enumerate(items):
        field = f"rubrics[{i}]"
        if not isinstance(item, Mapping):
            raise RubricFormatError(src, line, field, f"must be an object, got {type(item).__name__}")
        text = _text(item, "criterion", src, line, field=f"{field}.criterion")
        if wkey not in item and "weight" in item:
            wkey_i = "weight"
        else:
            wkey_i = wkey
        if wkey_i not in item:
            raise RubricFormatError(src, line, f"{field}.{wkey_i}", "missing")
        weight = _weight(item[wkey_i], scale, src, line, f"{field}.{wkey_i}")
        cid = str(item["id"]) if has_ids[i] else f"c{i + 1}"
        if cid in seen:
            raise RubricFormatError(src, line, f"{field}.id", f"duplicate criterion id {cid!r} (also rubrics[{seen[cid]}])")
        seen[cid] = i
        tags = item.get("tags") or ()
        if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
            raise RubricFormatError(src, line, f"{field}.tags", "must be a list of strings")
        criteria.append(Criterion(cid, text, weight, tuple(tags)))
    if "number_of_criteria" in rec and rec["number_of_criteria"] != len(criteria):
        raise RubricFormatError(src, line, "number_of_criteria", f"says {rec['number_of_criteria']!r} but rubrics has {len(criteria)}")
    if "total_weight" in rec:
        tw = rec["total_weight"]
        if isinstance(tw, bool) or not isinstance(tw, (int, float)) or not math.isclose(float(tw), sum(c.weight for c in criteria), abs_tol=1e-6):
            raise RubricFormatError(src, line, "total_weight", f"says {tw!r} but the weights sum to {sum(c.weight for c in criteria):g}")
    return Rubric(prompt_id, prompt, tuple(criteria))


def _collect(rows: Iterable[tuple[int, Mapping[str, Any]]], source: str, schema: str, scale: str | None) -> dict[str, Rubric]:
    out: dict[str, Rubric] = {}
    first: dict[str, int] = {}
    for line, rec in rows:
        r = parse_rubric(rec, source=source, line=line, schema=schema, scale=scale)
        if r.prompt_id in out:
            raise RubricFormatError(source, line, "prompt_id", f"duplicate prompt_id {r.prompt_id!r} (first on line {first[r.prompt_id]})")
        out[r.prompt_id] = r
        first[r.prompt_id] = line
    return out


def load_rubrics(path: str | os.PathLike, *, schema: str = "auto", scale: str | None = None) -> dict[str, Rubric]:
    """Reads a rubrics JSONL file (any supported schema) into {prompt_id: Rubric}, in file order."""
    return _collect(iter_jsonl(path), os.fspath(path), schema, scale)


def load_rubrics_dataset(name_or_path: str, *, config: str | None = None, split: str = "train", schema: str = "auto", scale: str | None = None) -> dict[str, Rubric]:
    """Reads rubrics through `datasets`: a local JSON/JSONL file, or a hub dataset such as
    `load_rubrics_dataset("JunkaiZ/Rubrics", config="health")`. Errors name the row (1-based)."""
    import datasets

    if os.path.exists(name_or_path):
        ds = datasets.load_dataset("json", data_files=name_or_path, split="train")
        source = name_or_path
    else:
        ds = datasets.load_dataset(name_or_path, config, split=split)
        source = f"{name_or_path}[{config or 'default'}/{split}] row"
    return _collect(((i + 1, row) for i, row in enumerate(ds)), source, schema, scale)


def rubric_to_record(rubric: Rubric, schema: str = "rubrax") -> dict[str, Any]:
    """The record of `rubric` in `schema` ("rubrax", "junkaiz" or "healthbench")."""
    paper = all(1.0 <= c.weight <= 3.0 for c in rubric.criteria)

    def num(w: float) -> float | int:
        return int(w) if float(w).is_integer() else w

    if schema == "rubrax":
        rec: dict[str, Any] = {"prompt_id": rubric.prompt_id, "prompt": rubric.prompt}
        rec["rubrics"] = [{"id": c.id, "criterion": c.text, "weight": num(c.weight), **({"tags": list(c.tags)} if c.tags else {})} for c in rubric.criteria]
        if not paper:
            rec["weight_scale"] = "points"
        return rec
    if schema == "junkaiz":
        return {
            "prompt": rubric.prompt,
            "rubrics": [{"criterion": c.text, "weight": num(c.weight)} for c in rubric.criteria],
            "number_of_criteria": len(rubric.criteria),
            "total_weight": num(rubric.total_weight),
        }
    if schema == "healthbench":
        return {
            "prompt_id": rubric.prompt_id,
            "prompt": [{"role": "user", "content": rubric.prompt}],
            "rubrics": [{"criterion": c.text, "points": num(c.weight), "tags": list(c.tags)} for c in rubric.criteria],
        }
    raise ValueError(f"schema must be rubrax, junkaiz or healthbench, got {schema!r}")


def write_rubrics(rubrics: Iterable[Rubric] | Mapping[str, Rubric], path: str | os.PathLike, *, schema: str = "rubrax") -> None:
    if isinstance(rubrics, Mapping):
        rubrics = rubrics.values()
    write_jsonl(path, (rubric_to_record(r, schema) for r in rubrics))


# --------------------------------------------------------------------------- responses and prompts


@dataclasses.dataclass(frozen=True)
class ResponseRecord:
    """One response to grade (or one candidate of an RTD pool)."""

    prompt_id: str
    response_id: str
    prompt: str
    response: str
    source_model: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.prompt_id, self.response_id)


def parse_response(rec: Mapping[str, Any], *, source: str = "<record>", line: int | None = None) -> ResponseRecord:
    src = source
    source_model = rec.get("source_model")
    if source_model is not None and not isinstance(source_model, str):
        raise RubricFormatError(src, line, "source_model", f"must be a string, got {type(source_model).__name__}")
    return ResponseRecord(
        prompt_id=_id(rec, "prompt_id", src, line),
        response_id=_id(rec, "response_id", src, line),
        prompt=_prompt(rec, src, line),
        response=_text(rec, "response", src, line, allow_empty=True),
        source_model=source_model,
    )


def read_responses(path: str | os.PathLike) -> list[ResponseRecord]:
    """Reads a responses JSONL file; (prompt_id, response_id) must be unique."""
    source = os.fspath(path)
    out, seen = [], {}
    for line, rec in iter_jsonl(source):
        r = parse_response(rec, source=source, line=line)
        if r.key in seen:
            raise RubricFormatError(source, line, "response_id", f"duplicate (prompt_id, response_id) {r.key} (first on line {seen[r.key]})")
        seen[r.key] = line
        out.append(r)
    return out


def read_prompts(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Reads {prompt_id, prompt} records (prompt_id derived from the text when absent)."""
    source = os.fspath(path)
    out, seen = [], {}
    for line, rec in iter_jsonl(source):
        prompt = _prompt(rec, source, line)
        pid = _id(rec, "prompt_id", source, line) if "prompt_id" in rec else derived_prompt_id(prompt)
        if pid in seen:
            raise RubricFormatError(source, line, "prompt_id", f"duplicate prompt_id {pid!r} (first on line {seen[pid]})")
        seen[pid] = line
        out.append((pid, prompt))
    return out
