"""Makes lm-evaluation-harness's own `lm_eval` command find the model "llama-jax".

lm-eval 0.4.13 looks models up only in its registry, filled by `lm_eval.models` from a fixed
table, and offers plugins no entry point. So the installed `llama_jax_lm_eval.pth` runs this
file (stdlib only, nothing of ours imported) at interpreter start-up: it waits for
`lm_eval.models` to be imported and then registers "llama-jax" as a lazy placeholder for
`infer.lm_eval_backend:LlamaJaxLM`, which is imported only when that model is asked for.
Waiting for `lm_eval.models` rather than the registry matters: lm-eval imports that table only
while the registry is empty, so an early registration would hide its own models.
"""

import importlib.machinery
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

WATCHED = "lm_eval.models"
MODEL_NAME = "llama-jax"
TARGET = "infer.lm_eval_backend:LlamaJaxLM"


class RegisterOnImport:
    """A meta path finder (not derived from `importlib.abc`, whose import costs start-up
    time): finds `lm_eval.models` as the path finder does and registers our model after it
    runs."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_and_register(module: ModuleType) -> None:
            run(module)
            from lm_eval.api.registry import model_registry

            if MODEL_NAME not in model_registry:
                model_registry.register(MODEL_NAME, target=TARGET)

        spec.loader.exec_module = run_and_register
        return spec


if not any(type(f).__name__ == RegisterOnImport.__name__ for f in sys.meta_path):
    sys.meta_path.insert(0, RegisterOnImport())
