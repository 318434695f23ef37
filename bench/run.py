"""The tinkerd benchmark suite: one command, every figure a ratio against a baseline
measured side by side in the same run.

    python -m bench.run [--only NAME ...] [--smoke] [--out PATH] [--strict]
    make bench

Benchmarks (one module each, `run(ctx, smoke) -> dict`):
  train_throughput  SDK forward_backward + optim_step vs transformers + PEFT   >= 0.9x
  multitenant       4 training sessions at once vs 1 alone (aggregate tok/s)   >= 0.95x
  sampling          32 concurrent requests x 64 tokens vs HF generate          >= 2x
                    1 request x 64 tokens vs HF generate batch 1               >= 1.5x
  multilora         the same load over 8 checkpoints vs all on 1               >= 0.8x
  ckpt_first_token  save_weights_for_sampler result -> first sampled token     median < 0.5 s
  scaling           step time vs batch size, sequence length, adapter count    (table)
  moe               a small random MoE (8 experts, top-2): training and decode
                    tokens/s of the engine vs transformers (+ PEFT)              (ratio)
  fairness          one user's lone 8-token request while another user has 200
                    x 64-token samples in flight vs the same request idle        < 2x
  memory            the server's RSS over 20,000 small sample requests (SDK and
                    OpenAI): end vs after warm-up, and its slope over the second
                    half                                                         < 1.1x
  ray_engines       the engine as a Ray actor (serve --ray) vs in the server's
                    process: sampling 32 x 64 and training 8 x 128 tokens/s      >= 0.9x
  custom_loss       a DPO step (4 pairs x 128 tokens) with the loss run on the
                    server vs on the client (forward + surrogate backward)       >= 1.3x
  prefix_reuse      an 8-turn rollout and 16 requests of one 1024-token prompt
                    with the sampler's prefix cache vs --prefix-cache-mb 0
                    (wall time; prompt tokens computed)                          < 0.8x

The server is a real `tinkerd serve` subprocess driven by the unmodified tinker SDK; the
baselines run in this process, taking turns with the server, never at the same time.
`--smoke` runs tiny sizes (about two minutes): it proves the suite works, its figures
mean nothing. Prints a table and writes JSON (default bench/results/bench[-smoke].json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS = ["train_throughput", "multitenant", "sampling", "multilora", "ckpt_first_token", "scaling", "moe", "fairness", "ray_engines",
              "custom_loss",
              "memory", "prefix_reuse"]
RESULTS = Path(__file__).resolve().parent / "results"


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"


def summary_table(results: dict[str, dict]) -> str:
    header = f"{'benchmark':<17} {'metric':<44} {'value':>10} {'baseline':>10} {'ratio':>6} {'target':>8} {'result':>6}  baseline is"
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        if result.get("error"):
            lines.append(f"{name:<17} {'ERROR: ' + result['error'].splitlines()[-1][:90]}")
            continue
        for r in result["rows"]:
            verdict = "-" if r["pass"] is None else ("PASS" if r["pass"] else "MISS")
            unit = "" if r["unit"] == "s" else f" {r['unit']}"
            lines.append(
                f"{name:<17} {r['name'] + unit:<44} {fmt(r['value'], r['unit']):>10} {fmt(r['baseline'], r['unit']):>10} "
                f"{fmt(r['ratio']):>6} {r['target'] or '-':>8} {verdict:>6}  {r['baseline_name'] or ''}")
        if not result["rows"]:
            lines.append(f"{name:<17} (table below)")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", action="extend", choices=BENCHMARKS, metavar="NAME",
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the suite runs; the figures mean nothing")
    ap.add_argument("--out", help="JSON output path (default: bench/results/bench.json, bench-smoke.json with --smoke)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed, not only on errors")
    args = ap.parse_args(argv)
    names = [n for n in BENCHMARKS if n in (args.only or BENCHMARKS)]

    from bench.common import Context, log, machine_info

    started = time.time()
    machine = machine_info()
    log(f"machine: {machine['cpu_model']}, {machine['cores_usable']} cores, torch {machine['torch']} ({machine['device']}), "
        f"load {machine['load_avg_1m_at_start']:.2f}")
    ctx = Context.create(args.smoke)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the server on the way out, as on Ctrl-C
    results: dict[str, dict] = {}
    try:
        for name in names:
            log(f"== {name}{' (smoke)' if args.smoke else ''}")
            module = importlib.import_module(f"bench.{name}")
            begin, load_before = time.time(), os.getloadavg()[0]
            try:
                result = module.run(ctx, args.smoke)
            except KeyboardInterrupt:
                results[name] = {"rows": [], "error": "interrupted", "elapsed_s": time.time() - begin}
                log("interrupted: stopping")
                break
            except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
                result = {"rows": [], "error": traceback.format_exc(), "server_log_tail": ctx.server_log_tail()}
                log(f"{name} failed:\n{result['error']}")
            result["elapsed_s"] = time.time() - begin
            result["load_avg_1m"] = [load_before, os.getloadavg()[0]]
            results[name] = result
            log(f"== {name} done in {result['elapsed_s']:.0f} s")
    finally:
        ctx.close()

    machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    print()
    print(f"tinkerd benchmarks{' (SMOKE SIZES: figures are meaningless)' if args.smoke else ''} - {ctx.model_name}")
    print(f"machine: {machine['cpu_model']} ({', '.join(machine['cpu_flags'])}), {machine['cores_usable']} cores, "
          f"{machine['memory_gb']} GB, torch {machine['torch']} on {machine['device']}, commit {machine['git_commit']}, "
          f"load avg {machine['load_avg_1m_at_start']:.2f} -> {machine['load_avg_1m_at_end']:.2f}")
    if machine["load_avg_1m_at_start"] > machine["cores_usable"] / 2:
        print(f"WARNING: the machine was busy before the suite started (load average {machine['load_avg_1m_at_start']:.1f} "
              f"on {machine['cores_usable']} cores): the ratios are noisier than usual")
    print()
    print(summary_table(results))
    if "scaling" in results and results["scaling"].get("tables"):
        from bench.scaling import format_tables

        print()
        print("scaling: time per training step (SDK forward_backward + optim_step)")
        print(format_tables(results["scaling"]["tables"]))

    out = Path(args.out) if args.out else RESULTS / ("bench-smoke.json" if args.smoke else "bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "suite": "tinkerd-bench", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke,
        "model": ctx.model_name, "machine": machine, "elapsed_s": time.time() - started, "benchmarks": results,
    }, indent=2, default=str))
    print(f"\nwrote {out} ({time.time() - started:.0f} s)")
    errors = [n for n, r in results.items() if r.get("error")]
    missed = [n for n, r in results.items() if any(row["pass"] is False for row in r["rows"])]
    if errors:
        print(f"errors in: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
