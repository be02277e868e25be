"""What a layer check found, in one shape for every layer: findings with causes, and the numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..compare import Comparison
from ..errors import ParityError
from ..checks import publish
from .causes import Cause


@dataclass
class Finding:
    """One thing that is wrong: ``cause`` names the culprit (:mod:`pytest_rlparity.layers.causes`), ``message`` says what to do."""

    cause: Cause
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.cause, Cause):
            raise TypeError(f"finding cause {self.cause!r} is not defined in pytest_rlparity.layers.causes")


@dataclass
class LayerResult:
    """Findings of one check plus the comparison they rest on; raises a :class:`ParityError`."""

    layer: str
    label: str
    comparison: Comparison
    findings: list[Finding] = field(default_factory=list)
    summary: str = "failed"
    """What a failure means for this layer, after the label in the message's first line."""
    extra: list[Comparison] = field(default_factory=list)
    """Further comparisons shown when they fail (e.g. top-k alternatives)."""
    note: str = ""
    """Numbers the check rests on beside its comparison (e.g. MoE routing flips per layer), for the report."""

    @property
    def ok(self) -> bool:
        return not self.findings

    def message(self) -> str:
        lines = [f"[{self.layer}] {self.label}: {self.summary}"]
        lines += [f"  - {f.cause}: {f.message}" for f in self.findings]
        lines.append(self.comparison.explain(self.label))
        lines += [c.explain("also") for c in self.extra if not c.ok]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Publish the check to the run's report, then raise if anything was found."""
        __tracebackhide__ = True
        entry = self.comparison.check_entry(self.label, self.layer, self.findings)
        if self.note:
            entry["note"] = self.note
        publish(entry, self.comparison)
        if not self.ok:
            first = self.findings[0]
            raise ParityError(self.message(), layer=self.layer, cause=str(first.cause), headline=f"{self.label}: {first.message}")
