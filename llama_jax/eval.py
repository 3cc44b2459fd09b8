"""`python -m llama_jax.eval`: evaluation entry points (code in `infer/`).

    python -m llama_jax.eval perplexity --checkpoint DIR --data FILE [--stride S ...]
    python -m llama_jax.eval lm-eval --model llama-jax --model_args checkpoint=DIR --tasks T

`perplexity` is `infer.perplexity`. `lm-eval` is lm-evaluation-harness's own CLI (same
arguments) with the "llama-jax" model registered, for installs without the start-up hook that
lets the plain `lm_eval` command find it (`infer.lm_eval_hook`); it needs the optional `eval`
extra. Core must not depend on `infer/` at import
time, so each command imports its module only when run.
"""

import sys
from collections.abc import Sequence

USAGE = "usage: python -m llama_jax.eval {perplexity,lm-eval} ARGS (--help after the command)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command == "perplexity":
        from infer.perplexity import main as perplexity

        return perplexity(rest)
    if command == "lm-eval":
        try:
            from infer.lm_eval_backend import run_cli
        except ModuleNotFoundError as e:
            if e.name != "lm_eval":
                raise
            print(f"llama_jax.eval lm-eval: {e.name} is missing: pip install 'llama-jax[eval]'")
            return 1
        return run_cli(rest)
    print(USAGE, file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
