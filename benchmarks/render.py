"""Render pytest-benchmark JSON (from `pytest benchmarks/ --benchmark-json PATH`) as results.

    python benchmarks/render.py bench.json [more.json | results.jsonl ...] [--md results.md]
                                [--png speedup.png] [--doc docs/benchmarks.md] [--merged all.json]

--md writes a markdown table (op, shape, provider, median ms, peak MiB, x vs
eager, x vs compile, % of floor) followed by the targets and the skipped
baselines; --png plots, per op, the speed-up of each provider over eager and
over torch.compile against the batch size (or key length); --doc replaces
the text between the `<!-- bench:start -->` and `<!-- bench:end -->` markers of
that file with the table, and, for the counts of benchmarks/bench_structure.py,
the text between the structure markers with their table (for benchmarks/bench_step_structure.py's
training step, the step markers); several JSON files (one per suite) are merged, and
--merged writes the merge. Ratios are recomputed here from the medians of the
same JSON, so any pytest-benchmark output of these suites renders. A .jsonl
input is the file benchmarks/conftest.py's --results-jsonl streams (one case a
line, as gpu_check.sh writes it): it has no session end, so its targets are
judged here, from its medians. Cases tagged `headline` get their own table first.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

from targets import targets_for

MARKERS = ("bench", "structure", "step")  # <!-- NAME:start --> ... <!-- NAME:end --> in a --doc file
OP_ORDER = ("prototype_infonce", "batch_prototypes", "multiview_infonce", "daf_attention", "train_step")
PROVIDER_ORDER = ("fused", "eager", "compile")


def load_lines(path: str) -> dict:
    """A --results-jsonl file as pytest-benchmark JSON: its cases, skips and the first session's
    device, with the targets judged from its medians."""
    benchmarks, skipped, meta = [], [], {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:   # a line cut short by a kill: the rest still counts
                print(f"{path}:{number}: skipped, not JSON ({exc})", file=sys.stderr)
                continue
            if "benchmark" in record:
                benchmarks.append(record["benchmark"])
            elif "skipped" in record:
                skipped.append(record["skipped"])
            elif "meta" in record and not meta:
                meta = record["meta"]
    by_case = defaultdict(dict)
    for bench in benchmarks:
        extra = bench.get("extra_info", {})
        if "op" in extra and "median_ms" in extra:
            by_case[extra["op"], extra["shape"]][extra["provider"]] = extra
    targets = [dict(op=op, shape=shape, **t) for (op, shape), providers in by_case.items()
               for t in targets_for(op, providers)]
    return {"datetime": meta.get("datetime", ""), "benchmarks": benchmarks,
            "mvcl_fast": {"device": meta.get("device"), "card": meta.get("card"),
                          "dtype": meta.get("dtype"), "dry_run": meta.get("dry_run", False),
                          "targets": targets, "skipped": skipped}}


def load(paths) -> dict:
    """One JSON, or several (one per suite) merged: benchmarks, targets and skips concatenated."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    merged: dict = {}
    for path in paths:
        if path.endswith(".jsonl"):
            data = load_lines(path)
        else:
            with open(path) as f:
                data = json.load(f)
        if not merged:
            merged = data
            merged.setdefault("benchmarks", [])
            merged.setdefault("mvcl_fast", {}).setdefault("targets", [])
            merged["mvcl_fast"].setdefault("skipped", [])
            continue
        merged["benchmarks"] += data.get("benchmarks", [])
        meta = data.get("mvcl_fast", {})
        for key in ("targets", "skipped"):
            merged["mvcl_fast"][key] += meta.get(key) or []
        for key in ("device", "card", "dtype", "dry_run"):
            if merged["mvcl_fast"].get(key) is None and meta.get(key) is not None:
                merged["mvcl_fast"][key] = meta[key]
    return merged


def rows_of(data: dict) -> list[dict]:
    """One row per measured case, with ratios against eager/compile of the same (op, shape)."""
    rows = []
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        if "op" not in extra or is_structure(bench) or not bench.get("stats"):
            continue
        rows.append({**extra, "median_ms": bench["stats"]["median"] * 1e3})
    by_case = defaultdict(dict)
    for row in rows:
        by_case[row["op"], row["shape"]][row["provider"]] = row
    for row in rows:
        providers = by_case[row["op"], row["shape"]]
        for base in ("eager", "compile"):
            other = providers.get(base)
            row[f"x_vs_{base}"] = other["median_ms"] / row["median_ms"] if other else None
        floor = row.get("floor_ms")
        row["floor_fraction"] = floor / row["median_ms"] if floor else None

    def order(row):
        op = OP_ORDER.index(row["op"]) if row["op"] in OP_ORDER else len(OP_ORDER)
        provider = (PROVIDER_ORDER.index(row["provider"]) if row["provider"] in PROVIDER_ORDER
                    else len(PROVIDER_ORDER))
        series = [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", row.get("series", ""))]
        return op, row["op"], row.get("x", 0), series, row["shape"], provider, row["provider"]

    return sorted(rows, key=order)


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> list[str]:
    lines = ["", "| op | shape | provider | median ms | peak MiB | x vs eager | x vs compile | % of floor |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        frac = r.get("floor_fraction")
        lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['median_ms']:.3f} | "
                     f"{_num(r.get('peak_mib'), '.1f')} | {_num(r['x_vs_eager'], '.2f')} | "
                     f"{_num(r['x_vs_compile'], '.2f')} | {_num(None if frac is None else 100 * frac, '.1f')} |")
    return lines


def markdown(data: dict) -> str:
    rows = rows_of(data)
    meta = data.get("mvcl_fast", {})
    card = meta.get("card") or {}
    lines = [f"Device: {meta.get('device', '?')}, dtype {meta.get('dtype', '?')}, "
             f"{data.get('datetime', '')[:19]}; forward + backward, median of the rounds."]
    if card:
        lines.append(f"Floor: max(bytes / {card['bandwidth'] / 1e12:.2f} TB/s, "
                     f"FLOPs / {card['bf16_flops'] / 1e12:.0f} TFLOP/s) ({card['name']} datasheet).")
    if meta.get("dry_run"):
        lines.append("DRY RUN (GPU_CHECK_ALLOW_CPU=1): tiny shapes, the fused kernels through Triton's "
                     "interpreter; these timings check the script, they are no benchmark result.")
    headline = [r for r in rows if r.get("headline")]
    others = [r for r in rows if not r.get("headline")]
    if headline:
        lines += ["", "Headline cases (timed first):", *table(headline)]
        if others:
            lines += ["", "Other cases:"]
    if others or not headline:
        lines += table(others)
    targets = meta.get("targets") or []
    if targets:
        lines += ["", "Targets (fused provider):", ""]
        for t in targets:
            verdict = {True: "pass", False: "FAIL", None: "not measured"}[t["pass"]]
            lines.append(f"- {verdict}: {t['op']} {t['shape']}: {t['target']} ({t['detail']})")
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {s['op']} {s['shape']} {s['provider']}: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def is_structure(bench: dict) -> bool:
    """A case of benchmarks/bench_structure.py: counts, not timings."""
    return "eager_launches" in bench.get("extra_info", {})


def structure_markdown(data: dict) -> str:
    """The counts of benchmarks/bench_structure.py (one forward + backward each) as a table."""
    lines = ["| op | shape | launches (Triton + aten) | host syncs | Triton bytes / floor | "
             "eager reference: launches, syncs |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for bench in filter(is_structure, data.get("benchmarks", [])):
        c = bench["extra_info"]
        shape = c["shape"]
        if "backward_units" in c:
            shape += f" (backward {c['backward_units']:.1f} units of V N^2 D)"
        lines.append(f"| `{c['op']}` | {shape} | {c['launches']} ({c['triton_launches']} + "
                     f"{c['launches'] - c['triton_launches']}) | {c['syncs']} | "
                     f"{c['bytes_over_floor']:.2f}x | {c['eager_launches']}, {c['eager_syncs']} |")
    return "\n".join(lines) + "\n"


def is_step(bench: dict) -> bool:
    """A case of benchmarks/bench_step_structure.py: a training step's counts per part."""
    return "step_table" in bench.get("extra_info", {})


def step_markdown(data: dict) -> str:
    """The training steps of benchmarks/bench_step_structure.py: each one's table per part."""
    blocks = []
    for bench in filter(is_step, data.get("benchmarks", [])):
        c = bench["extra_info"]
        static = ("yes" if c["static_shapes"]
                  else f"no (first difference: {c['first_shape_difference']})")
        blocks.append(f"`{c['step']}`, counted on {c['device']}\n\n{c['step_table']}\n\n"
                      f"Same launches and shapes for a second batch of other lengths: {static}\n")
    return "\n".join(blocks)


def plot(data: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    rows = rows_of(data)
    ops = [op for op in OP_ORDER if any(r["op"] == op for r in rows)]
    ops += sorted({r["op"] for r in rows} - set(ops))
    if not ops:
        raise SystemExit("no benchmark rows to plot")
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.2 * len(ops)), squeeze=False)
    for axes_row, op in zip(axes, ops):
        op_rows = [r for r in rows if r["op"] == op]
        for ax, base in zip(axes_row, ("eager", "compile")):
            lines = defaultdict(list)
            for r in op_rows:
                if r["provider"] != base and r[f"x_vs_{base}"] is not None:
                    lines[r["provider"], r.get("series", "")].append((r.get("x", 0), r[f"x_vs_{base}"]))
            for (provider, series), points in sorted(lines.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        linewidth=2.5 if provider == "fused" else 1.2,
                        label=f"{provider} {series}".strip())
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            if lines and min(v for pts in lines.values() for _, v in pts) > 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            x_label = op_rows[0].get("x_label", "N")
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"speed-up over {'torch.compile' if base == 'compile' else 'eager'}")
            ax.set_title(f"{op}: x vs {base}")
            if lines:
                ax.legend(fontsize=7)
    meta = data.get("mvcl_fast", {})
    fig.suptitle(f"mvcl_fast fwd+bwd on {meta.get('device', '?')} ({meta.get('dtype', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_between_markers(text: str, name: str, table: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"markers {start} ... {end} not found")
    return pattern.sub(lambda _: f"{start}\n{table}{end}", text, count=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json), one or more")
    parser.add_argument("--merged", help="write the inputs merged into one JSON here")
    parser.add_argument("--md", help="write the markdown table here (default: print it)")
    parser.add_argument("--png", help="write the speed-up plot here")
    parser.add_argument("--doc", help="replace the tables between the bench (structure, step) "
                                      "markers of this markdown file")
    args = parser.parse_args(argv)
    data = load(args.json)
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(data, f)
    structure = any(map(is_structure, data["benchmarks"]))
    step = any(map(is_step, data["benchmarks"]))
    timed = bool(rows_of(data))
    tables = {"bench": markdown(data)} if timed or not (structure or step) else {}
    if structure:
        tables["structure"] = structure_markdown(data)
    if step:
        tables["step"] = step_markdown(data)
    table = "\n".join(tables.values())
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)
    if args.png:
        plot(data, args.png)
    if args.doc:
        with open(args.doc) as f:
            text = f.read()
        for name, content in tables.items():
            text = replace_between_markers(text, name, content)   # raises before the file is touched
        with open(args.doc, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
