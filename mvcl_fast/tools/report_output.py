"""The compile report's output: the per-specialisation table, the per-arch summary and the
markdown table of docs/benchmarks.md (from --json reports of one or more Tritons)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mvcl_fast.tools.report import CompileResult


def problems(r: CompileResult) -> list[str]:
    if r.error:
        return [r.error]
    found = ["SPILLS"] if r.spills else []
    return found + (["SMEM>LIMIT"] if r.shared > r.shared_limit else [])


def _short_launches(launches: str) -> str:
    names = launches.split(", ")
    return names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else "")


def format_table(results: list[CompileResult]) -> str:
    header = ("module", "spec", "arch", "warps", "stages", "%16", "regs", "spill B", "stack B",
              "smem KiB", "limit KiB", "MMA", "first launch", "s", "status")
    rows = []
    for r in results:
        status = "ok" if r.ok else " ".join(problems(r))
        rows.append((r.module.rsplit(".", 1)[-1], r.spec, r.arch, str(r.num_warps), str(r.num_stages),
                     r.aligned or "-", str(r.registers), str(r.spills), str(r.stack_frame),
                     f"{r.shared / 1024:.1f}" if r.shared >= 0 else "-",
                     f"{r.shared_limit / 1024:.0f}", r.mma or "-", _short_launches(r.launches),
                     f"{r.seconds:.1f}", status))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def summary(results: list[CompileResult], reference_archs=()) -> str:
    """Counts per arch, the archs the ops dispatch to the reference on, then every failure on a
    line of its own."""
    lines = []
    for arch in dict.fromkeys(r.arch for r in results):
        rows = [r for r in results if r.arch == arch]
        mma = {}
        for r in rows:
            if r.mma:
                mma[r.mma] = mma.get(r.mma, 0) + 1
        lines.append(f"{arch}: {len(rows)} compiles, {sum(not r.ok for r in rows)} failed, "
                     f"{sum(r.spills > 0 for r in rows)} spill; MMA "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(mma.items())))
    lines += [f"{arch}: dispatches to the reference (the kernels are not built for it), nothing "
              "compiled" for arch in reference_archs]
    lines += [f"FAILED {r.arch} {r.module.rsplit('.', 1)[-1]} {r.spec} ({r.launches}): "
              + " ".join(problems(r))
              + (f", {r.spill_stores} B spill stores / {r.spill_loads} B loads at {r.registers} registers"
                 if r.spills else "")
              for r in results if not r.ok]
    return "\n".join(lines)


MODES = ("fp32", "fp32-tf32", "fp16", "bf16")


def _launch_modes(launches: str) -> set:
    """The dtype modes (aot.mode_name) of the launches of one specialisation."""
    return set(re.findall(r"[\[,](fp32-tf32|fp32|fp16|bf16)[,\]]", launches))


def markdown_table(reports: list[dict], arch: str = "sm_90a") -> str:
    """Markdown: per op and kernel, the specialisations, the MMA instruction of each dtype mode
    under the first report's Triton, and the spilling ones under every report's Triton."""
    def op(row):
        return row["module"].rsplit(".", 1)[-1]

    first = [r for r in reports[0]["results"] if r["arch"] == arch and r["kernel"]]
    kernels = sorted({(op(r), r["kernel"]) for r in first})
    header = (["op", "kernel", "specialisations",
               f"MMA on {arch}, triton {reports[0]['triton']} ({' / '.join(MODES)})"]
              + [f"triton {report['triton']}: spilling, max spill B/thread (stores + loads)"
                 for report in reports])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, kernel in kernels:
        rows = [r for r in first if (op(r), r["kernel"]) == (name, kernel)]
        mma = []
        for mode in MODES:  # the instructions of every specialisation this mode launches
            launched = [r for r in rows if mode in _launch_modes(r["launches"])]
            found = {ins for r in launched for ins in (r["mma"] or "none").split("+")}
            mma.append("+".join(sorted(found - {"none"}) or found) if launched else "-")
        cells = [name, f"`{kernel.lstrip('_')}`", str(len(rows)), " / ".join(mma)]
        for report in reports:
            mine = [r for r in report["results"] if r["arch"] == arch
                    and (op(r), r["kernel"]) == (name, kernel)]
            spilling = [r["spill_stores"] + r["spill_loads"] for r in mine if r["spills"]]
            cells.append(f"{len(spilling)} of {len(mine)}"
                         + (f", {max(spilling)}" if spilling else ""))
        lines.append("| " + " | ".join(cells) + " |")
    totals = "; ".join(
        f"triton {report['triton']}: {sum(r['arch'] == arch for r in report['results'])} compiles, "
        f"{sum(r['arch'] == arch and not r['ok'] for r in report['results'])} fail"
        for report in reports)
    return "\n".join(lines) + f"\n\n{totals}."
