"""Benchmark presets: the paper's six tasks as lm-eval task names and the metric of each.

``model-glue-paper`` is the evaluation of Model-GLUE's tables: ARC-Challenge (acc_norm),
WinoGrande (acc), MMLU (acc), GSM8K (exact match, strict answer extraction), MBPP and
HumanEval (pass@1). ``model-glue-paper-tiny`` is the proxy variant: tinyBenchmarks
(about 100 items each) where lm-eval has them, and MBPP / HumanEval themselves, which
have no tiny version (use a ``limit``). MBPP and HumanEval execute the model's code: a
preset that contains them needs ``evaluation.allow_code_execution: true``, which is
passed to lm-eval as its own opt-in (``confirm_run_unsafe_code``, ``HF_ALLOW_CODE_EVAL``).

Metric names are as :class:`model_glue.evaluate.Score` spells them: ``metric`` or
``metric,filter`` when lm-eval applies a named filter.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, str]] = {
    "model-glue-paper": {
        "arc_challenge": "acc_norm",
        "winogrande": "acc",
        "mmlu": "acc",
        "gsm8k": "exact_match,strict-match",
        "mbpp": "pass_at_1",
        "humaneval": "pass@1,create_test",
    },
    "model-glue-paper-tiny": {
        "tinyArc": "acc_norm",
        "tinyWinogrande": "acc_norm",
        "tinyMMLU": "acc_norm",
        "tinyGSM8k": "exact_match,strict-match",
        "mbpp": "pass_at_1",
        "humaneval": "pass@1,create_test",
    },
}

# tasks whose scoring runs code the model wrote (lm-eval marks them unsafe_code)
CODE_TASKS = frozenset({"mbpp", "humaneval"})


def preset_tasks(name: str) -> dict[str, str]:
    """Task -> metric of a preset (a KeyError names the presets there are)."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise KeyError(f"unknown preset {name!r} (allowed: {', '.join(PRESETS)})") from None
