"""Code Shield: insecure code in a reply is annotated or blocked, in the server (chat and
/v1/completions, whole and streamed) and in `python -m llama_jax.infer`.

The replies are scripted: the served tokenizer decodes whatever the tiny model generates as
the text a test sets (`ScriptedReplies`), so Code Shield sees known code while generation,
finish reasons and usage run as usual. Each snippet is one Code Shield case: MD5 for a
password (CWE-327 and CWE-328, regex rules), `shell=True` on user input (CWE-78, found by
semgrep's rules only), `gets` (CWE-242, error severity: what Code Shield recommends blocking).
A scan that runs semgrep costs about half a second, so there are few.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_guard import blocked_total, streamed

from infer import cli, code_shield
from infer.batching import Scheduler
from infer.code_shield import CodeShieldError, CodeShieldScanner, ScanResult
from infer.server import create_app

MD5 = (
    "Hash it like this:\n```python\nimport hashlib\n\n\ndef hash_password(password):\n"
    "    return hashlib.md5(password.encode()).hexdigest()\n```\n"
)
SHELL = (
    "```python\nimport subprocess\n\n\ndef run(user_input):\n"
    "    subprocess.call(user_input, shell=True)\n```\n"
)
GETS = (
    "```c\n#include <stdio.h>\n\nint main(void) {\n    char name[32];\n    gets(name);\n"
    "    return 0;\n}\n```\n"
)
CLEAN = "Add them:\n```python\ndef add(a, b):\n    return a + b\n```\n"
GETS_ISSUE = {"cwe_id": "CWE-242", "description": "Potential buffer overflow risk due to use of gets",
              "severity": "error", "line": 6}  # fmt: skip

CHAT = {
    "messages": [{"role": "user", "content": "Show me code"}],
    "max_tokens": 3,
    "temperature": 0,
}
# 55 tokens, CHAT's 35: one prefill shape (64-token chunks, 4-block tables) serves both.
COMPLETION = {"prompt": "Show me some code: a small C program that reads a name", "max_tokens": 3,
              "temperature": 0}  # fmt: skip
CLI_ARGS = ["--preset", "tiny", "--tokenizer", "bytes", "--prompt", COMPLETION["prompt"],
            "--max-new-tokens", "3"]  # fmt: skip


class ScriptedReplies:
    """A tokenizer whose replies read `reply`: a reply's first token decodes to all of it, the
    others to nothing; everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any, reply: str = "") -> None:
        self.tokenizer, self.reply = tokenizer, reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def detokenizer(self) -> _Once:
        return _Once(self.reply)


class _Once:
    def __init__(self, text: str) -> None:
        self.text = text

    def add(self, _token: int) -> str:
        text, self.text = self.text, ""
        return text

    def finish(self) -> str:
        return ""


@pytest.fixture(scope="module")
def served() -> tuple[Scheduler, ScriptedReplies]:
    """The scheduler `python -m llama_jax.infer` builds for CLI_ARGS (one slot, a 64-token
    context), so the CLI test compiles nothing more."""
    args = cli.generation_parser().parse_args(CLI_ARGS)
    scheduler = cli.make_scheduler(cli.load_model(args), args, max_len=64, slots=1)
    scheduler.tokenizer = replies = ScriptedReplies(scheduler.tokenizer)
    return scheduler, replies


@pytest.fixture(scope="module")
def shield() -> CodeShieldScanner:
    pytest.importorskip("codeshield.cs", reason="the codeshield extra is not installed")
    return code_shield.load()  # semgrep checked: it flags a known command injection


def found(part: dict) -> list[tuple[str, str, int]]:
    return [(i["cwe_id"], i["severity"], i["line"]) for i in part["issues"]]


def test_insecure_code_is_annotated_or_blocked_as_code_shield_recommends(served, shield):
    scheduler, replies = served
    with TestClient(create_app(scheduler, model_name="m", code_shield=shield)) as c:
        replies.reply = MD5
        [choice] = c.post("/v1/chat/completions", json=CHAT).json()["choices"]
        assert choice["message"]["content"] == MD5 and choice["finish_reason"] == "length"
        assert found(choice["code_shield"]) == [
            ("CWE-327", "warning", 7), ("CWE-327", "warning", 7), ("CWE-328", "warning", 7)]  # fmt: skip
        replies.reply = SHELL
        chunks = streamed(c, CHAT)  # held back until scanned, then sent in one piece
        assert [ch["delta"]["content"] for ch in chunks if ch["delta"].get("content")] == [SHELL]
        assert chunks[-1]["finish_reason"] == "length"
        assert found(chunks[-1]["code_shield"]) == [("CWE-78", "warning", 6)]
        replies.reply = GETS
        r = c.post("/v1/completions", json=COMPLETION).json()
        assert r["choices"] == [{"index": 0, "text": "", "logprobs": None,
                                 "finish_reason": "content_filter",
                                 "content_filter_results": {"flagged": True, "by": "code_shield",
                                                            "issues": [GETS_ISSUE]}}]  # fmt: skip
        assert r["usage"]["completion_tokens"] == 3
        chunks = streamed(c, COMPLETION, "/v1/completions")
        assert [(ch["text"], ch["finish_reason"]) for ch in chunks] == [("", "content_filter")]
        [choice] = c.post("/v1/chat/completions", json=CHAT).json()["choices"]
        assert choice["message"]["content"] == "" and choice["finish_reason"] == "content_filter"
        replies.reply = CLEAN
        [choice] = c.post("/v1/completions", json=COMPLETION).json()["choices"]
        assert choice == {"index": 0, "text": CLEAN, "finish_reason": "length", "logprobs": None}
        assert blocked_total(c, "code_shield", "output") == 3
        assert blocked_total(c, "guard", "output") == 0


def test_warn_policy_annotates_what_block_would_block(served, shield):
    scheduler, replies = served
    replies.reply = GETS
    warn = CodeShieldScanner("warn")
    with TestClient(create_app(scheduler, model_name="m", code_shield=warn)) as c:
        [choice] = c.post("/v1/chat/completions", json=CHAT).json()["choices"]
        assert choice["message"]["content"] == GETS and choice["finish_reason"] == "length"
        assert choice["code_shield"] == {"issues": [GETS_ISSUE]}
        assert blocked_total(c, "code_shield", "output") == 0


def test_load_refuses_a_semgrep_that_finds_nothing(shield, monkeypatch):
    """Code Shield reports no issue when semgrep skips the file (as semgrep >= 1.101 does with
    codeshield 1.0.1), so start-up must notice."""
    monkeypatch.setattr(
        CodeShieldScanner, "scan_blocking", lambda self, text: ScanResult(False, ())
    )
    with pytest.raises(CodeShieldError, match="does not flag a known command injection"):
        code_shield.load()


def test_infer_cli_shows_the_issues_after_the_reply(served, shield, monkeypatch, capsys):
    load_model = cli.load_model

    def scripted(args):
        model = load_model(args)
        model.tokenizer = ScriptedReplies(model.tokenizer, GETS)
        return model

    monkeypatch.setattr(cli, "load_model", scripted)
    assert cli.main([*CLI_ARGS, "--code-shield"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{cli.BLOCKED_TEXT}\n"
    assert err == "code shield: CWE-242 (error) line 6: Potential buffer overflow risk due to use of gets\n"  # fmt: skip
    assert cli.main([*CLI_ARGS, "--code-shield", "warn", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == GETS
    assert result["code_shield"] == {"blocked": False, "issues": [GETS_ISSUE]}


def test_code_shield_without_the_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "codeshield.cs", None)  # `import codeshield.cs` fails
    assert cli.main([*CLI_ARGS, "--code-shield"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama_jax.infer: error: --code-shield: Code Shield is not available")
    assert err.count("\n") == 1 and "pip install 'llama-jax[codeshield]'" in err
