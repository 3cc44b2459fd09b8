"""Turn raw timings into the report: medians, ratios, utilisation against the machine's limits,
the cross-check that both sides computed the same thing, targets, and a markdown table."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.workload import (
    QUANTIZED_SPEEDUP_TARGETS,
    TARGETS,
    Row,
    decode_step_bytes,
    prefill_flops,
    train_flops,
)
from llama_jax.config import LlamaConfig

SIDES = ("ours", "reference")


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _max_known(values) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _side_figures(row: Row, config: LlamaConfig, limits: dict, m: dict[str, Any]) -> dict:
    """One side's steady-state figures, cold-start cost and memory."""
    seconds = _median(m["runs"], "seconds")
    out: dict[str, Any] = {
        "tokens_per_s": row.tokens / seconds,
        "seconds": seconds,
        "seconds_all_runs": [round(r["seconds"], 5) for r in m["runs"]],
        "cpu_s": _median(m["runs"], "cpu_s"),  # process CPU time (all threads) per run
        "foreign_max": _max_known(r["foreign"] for r in m["runs"]),  # others' share meanwhile
        "cold_s": m["warmup"]["cold"]["seconds"],
        # what the first call costs beyond a steady one: compilation for us
        "first_call_overhead_s": m["warmup"]["cold"]["seconds"] - seconds,
        "setup_s": m["warmup"]["setup_s"],
        "peak_rss_mb": m["peak_rss_mb"],
        "steady_peak_rss_mb": m["steady_peak_rss_mb"],
    }
    if "first_start" in m:  # our side's start that filled the compilation cache
        first = m["first_start"]
        out["first_start"] = {
            "cold_s": first["cold"]["seconds"],
            "cold_first_token_s": first["cold"].get("first_token_s"),
            "peak_rss_mb": first["peak_rss_mb"],
        }
    if row.kind == "decode":
        step = _median(m["runs"], "step_s")
        floor = decode_step_bytes(config, row) / (limits["read_gbs"] * 1e9)
        out |= {
            "step_ms": 1e3 * step,
            "first_token_ms": 1e3 * _median(m["runs"], "first_token_s"),
            "cold_first_token_s": m["warmup"]["cold"]["first_token_s"],
            "bandwidth_util": floor / step,
        }
    else:
        flops = (prefill_flops if row.kind == "prefill" else train_flops)(config, row)
        out["mfu"] = flops / seconds / (limits["matmul_gflops"] * 1e9)
    return out


def _agreement(row: Row, ours: dict, ref: dict) -> dict[str, Any]:
    """Evidence that both sides ran the same model on the same inputs."""
    if row.kind == "decode":
        a, b = np.asarray(ours["tokens"]), np.asarray(ref["tokens"])
        same = np.cumprod(a == b, axis=1).sum(axis=1)  # common prefix length per sequence
        return {
            "first_tokens_equal": bool((a[:, 0] == b[:, 0]).all()),
            "mean_common_prefix": float(same.mean()),
            "of_tokens": row.new_tokens,
        }
    if row.kind == "prefill":
        a, b = np.load(ours["logits_file"]), np.load(ref["logits_file"])
        return {
            "max_abs_logit_diff": float(np.abs(a - b).max()),
            "argmax_equal": bool((a.argmax(-1) == b.argmax(-1)).all()),
        }
    return {
        "first_loss_ours": ours["first_loss"],
        "first_loss_reference": ref["first_loss"],
        "abs_diff": abs(ours["first_loss"] - ref["first_loss"]),
    }


def add_quantized_speedups(rows: list[dict[str, Any]], quantize: dict[str, str | None]) -> None:
    """Give each quantized row (`quantize[name]`, its mode) `vs_float32`: its tokens/s over
    that of its float row (the name without the mode suffix) in the same run, with the
    `QUANTIZED_SPEEDUP_TARGETS` goal among its targets."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        mode = quantize.get(r["name"])
        base = by_name.get(r["name"].removesuffix(f"_{mode}")) if mode else None
        if base is None:
            continue
        r["vs_float32"] = r["ours"] / base["ours"]
        goal = QUANTIZED_SPEEDUP_TARGETS.get(r["name"])
        if goal is not None:
            met = r["vs_float32"] >= goal
            r["targets"]["vs_float32"] = {"target": goal, "value": r["vs_float32"], "met": met}


def _targets(name: str, row_report: dict[str, Any]) -> dict[str, Any]:
    values = {
        "bandwidth_util": row_report["ours_detail"].get("bandwidth_util"),
        "mfu": row_report["ours_detail"].get("mfu"),
    }
    out = {
        key: {"target": goal, "value": values[key], "met": values[key] >= goal}
        for key, goal in TARGETS.get(name, {}).items()
    }
    ours_mem, ref_mem = (row_report[f"{s}_detail"]["peak_rss_mb"] for s in SIDES)
    if ours_mem is not None and ref_mem is not None:
        out["peak_memory"] = {"target": ref_mem, "value": ours_mem, "met": ours_mem <= ref_mem}
    return out


def row_report(row: Row, config: LlamaConfig, limits: dict, measured: dict) -> dict[str, Any]:
    """One row of the JSON report; `measured[side]` holds warmup, runs, check and memory."""
    detail = {s: _side_figures(row, config, limits, measured[s]) for s in SIDES}
    ours, ref = detail["ours"]["tokens_per_s"], detail["reference"]["tokens_per_s"]
    out = {
        "name": row.name,
        "unit": "tokens/s",
        "ours": ours,
        "reference": ref,
        "ratio": ours / ref,
        # the ratio ours would reach at 100% of the measured limit (peak FLOP/s or bandwidth):
        # a ratio target above it cannot be met on this machine against this reference
        "ratio_ceiling": 1.0 / _utilisation(detail["reference"]),
        "shape": {"batch": row.batch, "length": row.length, "new_tokens": row.new_tokens},
        "ours_detail": detail["ours"],
        "reference_detail": detail["reference"],
        "agreement": _agreement(row, measured["ours"]["check"], measured["reference"]["check"]),
        "retried_pairs": measured["retried_pairs"],
    }
    if "acceptance_rate" in measured["ours"]["check"]:  # speculative decoding's draft tokens
        out["acceptance_rate"] = measured["ours"]["check"]["acceptance_rate"]
    out["targets"] = _targets(row.name, out)
    return out


# --- the table ------------------------------------------------------------------------------


def _utilisation(detail: dict[str, Any]) -> float:
    """A side's share of the limit that bounds its row: bandwidth (decode) or matmul peak."""
    return detail["bandwidth_util"] if "bandwidth_util" in detail else detail["mfu"]


def _util(detail: dict[str, Any]) -> str:
    kind = "BW" if "bandwidth_util" in detail else "MFU"
    return f"{_utilisation(detail):.1%} {kind}"


def _with_first_start(detail: dict[str, Any], figure: Callable[[dict[str, Any]], str]) -> str:
    """`figure` of a side, followed in brackets by that of its first start where reported."""
    first = detail.get("first_start")
    return figure(detail) + (f" ({figure(first)})" if first else "")


def _mem(detail: dict[str, Any]) -> str:
    return "n/a" if detail["peak_rss_mb"] is None else f"{detail['peak_rss_mb']:,.0f}"


def _cold(detail: dict[str, Any]) -> str:
    return f"{detail.get('cold_first_token_s') or detail['cold_s']:.2f}"


def target_marks(targets: dict[str, dict[str, Any]]) -> str:
    """Each target as `name >= goal ok|MISSED` (a utilisation; "no peak" where none could be
    computed) or `name ok|MISSED` (peak memory, whose goal is the reference's figure)."""
    marks = {True: "ok", False: "MISSED", None: "no peak"}

    def mark(key: str, t: dict[str, Any]) -> str:
        goal = {"peak_memory": "", "vs_float32": f" >= {t['target']:.1f}x"}.get(
            key, f" >= {t['target']:.0%}"
        )
        return f"{key}{goal} {marks[t['met']]}"

    return ", ".join(mark(k, t) for k, t in targets.items())


def table(report: dict[str, Any]) -> str:
    """Markdown table of a report (what the README shows)."""
    lines = [
        "| row | utilisation ours / ref | targets | ours tok/s | transformers tok/s "
        "| ratio (ceiling) | cold s ours / ref | peak RSS MB ours / ref |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        o, f = r["ours_detail"], r["reference_detail"]
        lines.append(
            f"| {r['name']} | {_util(o)} / {_util(f)} | {target_marks(r['targets'])} "
            f"| {r['ours']:,.1f} | {r['reference']:,.1f} "
            f"| {r['ratio']:.2f}x ({r['ratio_ceiling']:.2f}x) "
            f"| {_with_first_start(o, _cold)} / {_with_first_start(f, _cold)} "
            f"| {_with_first_start(o, _mem)} / {_with_first_start(f, _mem)} |"
        )
    lim = report["limits"]
    lines.append("")
    lines.append(
        "Ceiling: the ratio at 100% of the measured limit (bandwidth for decode, matmul peak "
        "otherwise), given the reference's utilisation in the same run."
    )
    if any("first_start" in r["ours_detail"] for r in report["rows"]):
        lines.append(
            "Ours starts with its compilation cache filled by an earlier start; in brackets, "
            "that first start (compiling)."
        )
    lines.append(
        f"Limits measured in the same run: float32 matmul peak {lim['matmul_gflops']:.0f} GFLOP/s, "
        f"memory read bandwidth {lim['read_gbs']:.1f} GB/s ({lim['cores']} cores)."
    )
    decode = [r for r in report["rows"] if "step_ms" in r["ours_detail"]]
    for r in decode:
        o, f = r["ours_detail"], r["reference_detail"]
        lines.append(
            f"{r['name']}: step {o['step_ms']:.1f} ms vs {f['step_ms']:.1f} ms; first token "
            f"{o['first_token_ms']:.0f} ms vs {f['first_token_ms']:.0f} ms."
            + (f" {r['vs_float32']:.2f}x our float32 tokens/s." if "vs_float32" in r else "")
            + (
                f" {r['acceptance_rate']:.0%} of draft tokens accepted."
                if "acceptance_rate" in r
                else ""
            )
        )
    return "\n".join(lines)
