"""synth.* and scenarios.accept params and results."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from modelsmith.rpc.dispatch import MutatingParams, QueryParams


class SynthRunParams(MutatingParams):
    """``synth.run``: new scenarios like the failures of eval ``from_eval``."""

    cluster: str
    from_eval: str
    pattern: str | None = None  # one pattern id ("choice/wrong_value"); default: every pattern
    count: Annotated[int, msgspec.Meta(ge=1, le=200)] = 4  # candidates per pattern
    # A named engine ([engines.NAME]) as the teacher; default: the cluster's [synthesis] generator.
    teacher: str | None = None


class SynthStarted(msgspec.Struct, kw_only=True):
    job_id: str = msgspec.field(name="jobId")
    status: str
    cluster: str
    log: str


class SynthCountsView(msgspec.Struct, kw_only=True):
    generated: int
    dropped_invalid: int
    dropped_reference_fails: int
    dropped_duplicate: int
    refused_near_held_out: int
    kept: int


class SynthRejection(msgspec.Struct, kw_only=True):
    pattern: str
    reason: str  # invalid, near_held_out, duplicate, reference_fails
    detail: str
    match: str | None = None


class SynthResult(msgspec.Struct, kw_only=True):
    """What a finished synth job returns (``job.get``'s ``result``)."""

    cluster: str
    eval_tag: str
    patterns: list[str]
    counts: SynthCountsView
    ids: list[str]
    file: str | None
    teacher: str | None = None
    teacher_model: str | None = None
    generator: str | None = None
    rejections: list[SynthRejection] = []


class SynthListParams(QueryParams):
    cluster: str


class SyntheticScenario(msgspec.Struct, kw_only=True):
    id: str
    sha256: str  # scenario_hash: what an acceptance signs
    prompt: str
    reference: str | None
    provenance: dict[str, Any] | None = None


class SynthList(msgspec.Struct, kw_only=True):
    cluster: str
    version: str | None  # the synthetic set's version (None: the cluster has none)
    scenarios: list[SyntheticScenario]


class ScenariosAcceptParams(MutatingParams):
    """``scenarios.accept``: an SSH-signed statement (decision ``accept``) whose digest is
    ``acceptance_digest(cluster, [(id, sha256) ...])`` of exactly ``ids``."""

    cluster: str
    ids: Annotated[list[str], msgspec.Meta(min_length=1, max_length=10_000)]
    statement: str
    signature: str
    principal: str | None = None


class ScenariosAccepted(msgspec.Struct, kw_only=True):
    cluster: str
    ids: list[str]
    file: str
    principal: str
    versions: dict[str, str]
