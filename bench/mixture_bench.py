"""Mixture benchmark on the demo zoo: the project's counterpart of the paper's mixture table.

Experts: the three same-base specialists (add-a, next-a, last-a). Merged model (attention,
embeddings and norms of the weight-level mixtures): their uniform linear merge. Documents of
the demo tasks are split by doc id: even ids are the proxy set (labels for the fitted router),
odd ids the evaluation set every number below is measured on.

Reports per variant: mean exact match over demo_add/next/last, per-task scores, router accuracy
(model-level only, see model_glue/mixture/accuracy.py), parameter count, and wall time per
evaluated sample (lm-eval included; a shared 2-core machine, so read ratios, not absolutes).

    .venv/bin/python bench/mixture_bench.py [--zoo DIR] [--out .glue/bench/mixture.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from model_glue.env import configure_environment, glue_home

configure_environment()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from model_glue.mixture import (  # noqa: E402
    MixtureError,
    MixtureLM,
    RouterInit,
    build_block_level_mixture,
    build_ffn_moe,
    build_hybrid,
    build_model_level_mixture,
    expert_correctness,
    fit_mixture_router,
    load_mixture,
    router_accuracy,
)
from model_glue.mixture.hidden import layer_inputs  # noqa: E402
from model_glue.zoo.eval_sets import LM_TASKS_DIR  # noqa: E402

EXPERTS = ["add-a", "next-a", "last-a"]
TASKS = ["demo_add", "demo_next", "demo_last"]
BACKBONE, ROUTER_LAYER = "base-a", 2
POSITIVE = {
    "add-a": ["3+4=", "12+5=", "7+9=", "15+3=", "0+8="],
    "next-a": ["next abc=", "next hello=", "next tree=", "next moon=", "next quiz="],
    "last-a": ["last abc=", "last hello=", "last tree=", "last moon=", "last quiz="],
}
PROMPTS = {
    name: {
        "positive": pos,
        "negative": [p for other, ps in POSITIVE.items() if other != name for p in ps],
    }
    for name, pos in POSITIVE.items()
}
# documents in each task's test split (150 add prompts, 200 next and last words)
N_DOCS = {t: len((LM_TASKS_DIR / f"{t}.jsonl").read_text().splitlines()) for t in TASKS}
EVAL_IDS = {t: list(range(1, N_DOCS[t], 2)) for t in TASKS}


def timed_lm(lm):
    """An lm-eval LM that delegates to ``lm`` and adds up the seconds spent in model calls."""
    from lm_eval.api.model import LM

    class TimedLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.seconds = 0.0

        def _timed(self, method: str, requests, **kwargs):
            start = time.perf_counter()
            try:
                return getattr(lm, method)(requests, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        def loglikelihood(self, requests, **kwargs):
            return self._timed("loglikelihood", requests, **kwargs)

        def loglikelihood_rolling(self, requests, **kwargs):
            return self._timed("loglikelihood_rolling", requests, **kwargs)

        def generate_until(self, requests, **kwargs):
            return self._timed("generate_until", requests, **kwargs)

    return TimedLM()


def score(lm, samples: dict[str, list[int]]) -> tuple[dict[str, float], float]:
    """Exact match per task on ``samples`` and model seconds per sample (routing included)."""
    import lm_eval

    from model_glue.evaluate import scores_from_results, task_manager

    timed = timed_lm(lm)
    res = lm_eval.simple_evaluate(
        model=timed, tasks=TASKS, samples=samples, task_manager=task_manager(), bootstrap_iters=0
    )
    per_task = {s.task: s.value for s in scores_from_results(res) if s.metric == "exact_match"}
    return per_task, timed.seconds / sum(len(v) for v in samples.values())


def hf_lm(model, tokenizer):
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=model.eval(),
        tokenizer=tokenizer,
        batch_size=32,
        max_length=model.config.max_position_embeddings,
    )


def n_params(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=glue_home() / "zoo")
    ap.add_argument("--out", type=Path, default=glue_home() / "bench" / "mixture.json")
    args = ap.parse_args()
    models = args.zoo / "models"
    missing = [n for n in [*EXPERTS, BACKBONE] if not (models / n / "config.json").exists()]
    if missing:
        sys.exit(
            f"demo zoo incomplete at {models}: missing {missing} (build it with build_demo_zoo)"
        )
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(models / EXPERTS[0])
    expert_dirs = [models / n for n in EXPERTS]
    rows: list[dict] = []

    def record(
        variant: str, router: str, lm, params: int, acc: float | None = None, **extra
    ) -> None:
        per_task, sec = score(lm, EVAL_IDS)
        row = {
            "variant": variant,
            "router": router,
            "mean": sum(per_task.values()) / len(per_task),
            **{t.removeprefix("demo_"): v for t, v in per_task.items()},
            "router_accuracy": acc,
            "params": params,
            "ms_per_sample": 1000 * sec,
            **extra,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="mixture-bench-") as tmp_name:
        tmp = Path(tmp_name)
        from model_glue.merge import merge_in_memory

        dense = [AutoModelForCausalLM.from_pretrained(d) for d in expert_dirs]
        merged = AutoModelForCausalLM.from_pretrained(expert_dirs[0])
        merged.load_state_dict(
            merge_in_memory("linear", [m.state_dict() for m in dense], names=EXPERTS)
        )
        merged.save_pretrained(tmp / "merged")
        tok.save_pretrained(tmp / "merged")

        for name, model in [*zip(EXPERTS, dense, strict=True), ("merged (linear)", merged)]:
            record(f"single: {name}", "-", hf_lm(model, tok), n_params(model))

        # model-level: labels from proxy docs (fitted router) and eval docs (router accuracy)
        inits = [RouterInit("hidden"), RouterInit("cheap_embed"), RouterInit("random")]
        first = load_mixture(
            build_model_level_mixture(
                expert_dirs,
                tmp / "ml-hidden",
                router_backbone=models / BACKBONE,
                layer=ROUTER_LAYER,
                router=inits[0],
                prompts=PROMPTS,
            )
        )
        labels = expert_correctness(first, TASKS)
        eval_labels = labels.subset([i for i, d in enumerate(labels.doc_ids) if d % 2 == 1])
        proxy_labels = labels.subset([i for i, d in enumerate(labels.doc_ids) if d % 2 == 0])
        routers = [(r.method, r) for r in inits]
        try:
            fitted = fit_mixture_router(first, proxy_labels)
            routers.append(("linear (fitted)", fitted))
        except MixtureError as e:  # e.g. no expert answers any proxy sample
            print(f"fitted router skipped: {e}", flush=True)
            fitted = None
        ml_params = sum(n_params(m) for m in first.experts) + n_params(first.backbone)
        for label, router in routers:
            mix = load_mixture(
                build_model_level_mixture(
                    expert_dirs,
                    tmp / f"ml-{label.split()[0]}",
                    router_backbone=models / BACKBONE,
                    layer=ROUTER_LAYER,
                    router=router,
                    prompts=PROMPTS,
                )
            )
            acc = router_accuracy(mix.route(eval_labels.contexts), eval_labels)
            overall = next(a for a in acc if a.task == "all")
            record(
                "model-level",
                label,
                MixtureLM(mix, batch_size=32),
                ml_params,
                overall.accuracy,
                router_accuracy_per_task={a.task: a.accuracy for a in acc},
            )

        # router accuracy of the model-level `hidden` router at each backbone layer
        backbone = first.backbone
        layer_acc = {}
        for layer in range(backbone.config.num_hidden_layers):
            from model_glue.mixture.routers import init_gates

            gate = init_gates(
                inits[0], backbone, first.backbone_tokenizer, PROMPTS, EXPERTS, [layer]
            )[0]
            pooled = layer_inputs(
                backbone, first.backbone_tokenizer, eval_labels.contexts, [layer]
            )[0]
            acc = router_accuracy((pooled @ gate.T).argmax(1).tolist(), eval_labels)
            layer_acc[layer] = next(a for a in acc if a.task == "all").accuracy
        oracle = next(
            a
            for a in router_accuracy([0] * len(eval_labels.contexts), eval_labels)
            if a.task == "all"
        )

        for router in inits:
            blk = load_mixture(
                build_block_level_mixture(
                    tmp / "merged",
                    expert_dirs,
                    tmp / f"blk-{router.method}",
                    router=router,
                    prompts=PROMPTS,
                    pooling="mean",
                )
            )
            record("block-level", router.method, MixtureLM(blk, batch_size=32), n_params(blk))
        for router in inits:
            path = build_ffn_moe(
                tmp / "merged",
                expert_dirs,
                tmp / f"ffn-{router.method}",
                router=router,
                prompts=PROMPTS,
            )
            moe = AutoModelForCausalLM.from_pretrained(path)
            record("FFN-level (top-2)", router.method, hf_lm(moe, tok), n_params(moe))
        for k in range(1, merged.config.num_hidden_layers):
            path = build_hybrid(
                tmp / "merged", expert_dirs, tmp / f"hyb-{k}", k=k, router=inits[0], prompts=PROMPTS
            )
            moe = AutoModelForCausalLM.from_pretrained(path)
            record(f"hybrid k={k}", "hidden", hf_lm(moe, tok), n_params(moe))

    result = {
        "experts": EXPERTS,
        "backbone": BACKBONE,
        "router_layer": ROUTER_LAYER,
        "eval_docs_per_task": len(EVAL_IDS[TASKS[0]]),
        "coverage": oracle.coverage,
        "fitted_router_train_accuracy": fitted.train_accuracy if fitted else None,
        "model_level_hidden_router_accuracy_by_layer": layer_acc,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "| variant | router | mean | add | next | last | router acc. | params | ms/sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        acc = "-" if r["router_accuracy"] is None else f"{r['router_accuracy']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['router']} | {r['mean']:.3f} | {r['add']:.2f} | {r['next']:.2f} | "
            f"{r['last']:.2f} | {acc} | {r['params'] / 1e6:.2f} M | {r['ms_per_sample']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
