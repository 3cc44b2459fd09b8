"""Meta's Code Shield as a scanner of generated text: insecure code is blocked or annotated.

Code Shield (the `codeshield` package of PurpleLlama) scans a piece of text for insecure code:
regular expressions per language and, where a pre-scan pattern hints at a problem, semgrep's
rules (the `osemgrep` binary inside the semgrep wheel). Its verdict recommends a treatment:
BLOCK when an issue has error severity, WARN for the others. Under the `block` policy a
scanner follows that recommendation; under `warn` it never blocks and only reports the issues.

`codeshield` is optional (`pip install 'llama-jax[codeshield]'`) and imported when a scanner
is made. codeshield 1.0.1 runs semgrep with `--project-root /`, and semgrep 1.101 and later
(checked up to 1.187) then skip the file and find nothing, without an error. Code Shield
also answers "nothing found" when semgrep fails, so `load` scans a known command injection,
which only semgrep's rules find, and refuses to start when it goes unflagged.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.metadata
from dataclasses import dataclass
from typing import Any

INSTALL = "pip install 'llama-jax[codeshield]' (codeshield 1.0.1 with semgrep 1.100.0)"

# Command injection (CWE-78): semgrep's `insecure-subprocess-using-shell` rule flags it, and no
# regular expression of Code Shield does.
KNOWN_INJECTION = (
    "import subprocess\n\ndef run(command):\n    subprocess.call(command, shell=True)\n"
)
SEMGREP_ONLY_CWE = "CWE-78"


class CodeShieldError(RuntimeError):
    """Code Shield cannot be used: not installed, or its semgrep analyzer finds nothing."""


class Policy(enum.StrEnum):
    BLOCK = "block"  # block what Code Shield recommends blocking, annotate the rest
    WARN = "warn"  # never block: annotate every reply with issues


Issue = dict[str, Any]  # {"cwe_id", "description", "severity", "line"}


@dataclass(frozen=True)
class ScanResult:
    """One text's verdict: `issues` as Code Shield reports them (line numbers count from the
    text's first line), `blocked` when the policy blocks the text."""

    blocked: bool
    issues: tuple[Issue, ...]

    def to_json(self) -> dict[str, Any]:
        return {"blocked": self.blocked, "issues": list(self.issues)}


class CodeShieldScanner:
    """Code Shield under a policy. Use `load`, which checks that semgrep works."""

    def __init__(self, policy: Policy | str = Policy.BLOCK) -> None:
        try:
            from codeshield.cs import CodeShield, Treatment
        except Exception as e:  # ImportError, or its semgrep binary missing at import
            raise CodeShieldError(f"Code Shield is not available ({e}); {INSTALL}") from None
        self.policy = Policy(policy)
        self._scan_code, self._block = CodeShield.scan_code, Treatment.BLOCK

    def scan_blocking(self, text: str) -> ScanResult:
        """Scan `text` (a whole reply: prose and code blocks alike), waiting for semgrep."""
        if not text.strip():
            return ScanResult(False, ())
        found = asyncio.run(self._scan_code(text))
        # The C rules run again for C++ (and Objective-C): one finding may come several times.
        unique = dict.fromkeys(tuple(_issue(i).items()) for i in found.issues_found or ())
        issues = tuple(dict(items) for items in unique)
        block = self.policy is Policy.BLOCK and found.recommended_treatment == self._block
        return ScanResult(block, issues)

    async def scan(self, text: str) -> ScanResult:
        """`scan_blocking` on a worker thread, so an event loop keeps serving meanwhile."""
        return await asyncio.to_thread(self.scan_blocking, text)


def _issue(issue: Any) -> Issue:
    # Regex findings carry a `Severity` enum, semgrep's its upper-case name: one spelling.
    severity = getattr(issue.severity, "value", issue.severity)
    return {
        "cwe_id": issue.cwe_id,
        "description": issue.description,
        "severity": str(severity).lower(),
        "line": issue.line,
    }


def load(policy: Policy | str = Policy.BLOCK) -> CodeShieldScanner:
    """A scanner whose semgrep analyzer is known to work; CodeShieldError otherwise."""
    scanner = CodeShieldScanner(policy)
    found = scanner.scan_blocking(KNOWN_INJECTION).issues
    if not any(i["cwe_id"] == SEMGREP_ONLY_CWE for i in found):
        version = importlib.metadata.version("semgrep")
        raise CodeShieldError(
            f"semgrep {version} does not flag a known command injection, so Code Shield would "
            f"miss what its semgrep rules find; {INSTALL}"
        )
    return scanner
