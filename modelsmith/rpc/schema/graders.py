"""scenarios.import_graders params and result."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from modelsmith.rpc.dispatch import MutatingParams

#: what a grader file plus its items may weigh on the wire (the frame is 4 MiB)
MAX_IMPORT_BYTES = 3 * 1024 * 1024


class ImportGradersParams(MutatingParams):
    """``scenarios.import_graders``: OpenAI grader JSON and its dataset items (JSONL), as text.

    Each item becomes a scenario of ``set`` in ``<cluster>/scenarios/<set>/<name>.jsonl``; the
    grader JSON is kept verbatim beside it as ``<name>.graders.json``. ``prompt`` is a template
    over the item (``{{item.question}}``; default ``{{item.input}}``; an item field holding a
    list of chat messages becomes a chat prompt); ``reference`` a template for the scenario's
    reference (default: the first grader's reference). ``judge_engine`` runs the model graders
    (a named engine, or ``cluster``). ``dry_run`` converts and checks, and writes nothing.
    """

    cluster: str
    set: Literal["core", "held-out"]
    name: Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")]
    graders: Annotated[str, msgspec.Meta(max_length=MAX_IMPORT_BYTES)]
    items: Annotated[str, msgspec.Meta(max_length=MAX_IMPORT_BYTES)]
    judge_engine: str | None = None
    prompt: str = "{{item.input}}"
    reference: str | None = None
    domain: str | None = None
    pass_mark: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    dry_run: bool = False


class GraderMapping(msgspec.Struct, kw_only=True):
    grader: str  # its path in the file: "grader", "testing_criteria[1]", "grader.graders.email"
    type: str  # the OpenAI grader type
    criterion: str  # the native criterion kind it became
    note: str = ""


class ImportGradersResult(msgspec.Struct, kw_only=True):
    cluster: str
    set: str
    name: str
    scenarios: int
    dry_run: bool
    mapping: list[GraderMapping]
    files: list[str] = msgspec.field(default_factory=list)
    version: str | None = None  # the set's version after the import
    changed: list[str] = msgspec.field(default_factory=list)  # sets recorded anew in the ledger
