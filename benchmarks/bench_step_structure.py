"""One MVCL-DAF++ training step, counted on the CPU as it would run on CUDA.

mvcl_fast.tools.step_structure counts a real Trainer's train_step at batch 16 and MIntRec shapes
(benchmarks/step_trainer.py: text 30 word pieces + the label slots, video 230 x 1024, audio
480 x 768) with bert-base text encoders (random init), bf16 autocast, fused AdamW, gradient
clipping and the fused ops, after one uncounted step (AdamW's state then exists, as in every
later step). extra_info holds the launches, host syncs (with their file:line), FLOPs, bytes,
the predicted roofline time and the most launched ops per part, the step's totals, and whether
a second batch of other lengths runs the same launches on the same shapes. The timed part is
the counting run itself (CPU time, meaningless for speed). CPU only, the fused ops' launches
captured through Triton's interpreter; minutes on a 2-core CPU.
"""
import os
from collections import Counter

import pytest

from harness import CUDA, DRY_RUN, device_name

if CUDA or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("the step is counted on the CPU, the fused ops' launches through Triton's "
                "interpreter (TRITON_INTERPRET=1, no GPU)", allow_module_level=True)
if DRY_RUN:
    pytest.skip("dry run: a bert-base step counted at MIntRec shapes takes minutes",
                allow_module_level=True)

from mvcl_fast.tools.step_structure import count_train_step, first_difference  # noqa: E402
from step_trainer import MINTREC, mintrec_trainer  # noqa: E402

BATCH = 16


def test_train_step_structure(benchmark, tmp_path):
    pytest.importorskip("transformers")
    trainer = mintrec_trainer(tmp_path, BATCH)
    try:
        batches = iter(trainer.train_loader)
        first, second = next(batches), next(batches)
        trainer.train_step(first)
        step = benchmark.pedantic(lambda: count_train_step(trainer, first), rounds=1, iterations=1)
        other = count_train_step(trainer, second)
    finally:
        trainer.close()
    print(step.table())
    difference = first_difference(step, other)
    benchmark.extra_info.update(
        step=f"train_step B={BATCH} text {trainer.cfg.seq_len} video {MINTREC['video'][0]}x"
             f"{MINTREC['video'][1]} audio {MINTREC['audio'][0]}x{MINTREC['audio'][1]} "
             "bert-base bf16", device=device_name(),
        launches=len(step.launches), syncs=len(step.syncs), predicted_ms=step.predicted_ms,
        static_shapes=difference is None, first_shape_difference=difference,
        parts={name: dict(launches=t.launches, forward=t.forward, backward=t.backward,
                          syncs=t.syncs, flops=t.flops, bytes=t.bytes,
                          predicted_ms=1e3 * t.predicted_seconds,
                          most_launched=Counter(launch.name for launch in step.launches
                                                if launch.part == name).most_common(5))
               for name, t in step.parts().items()},
        sync_sites=[str(sync) for sync in step.syncs], step_table=step.table(markdown=True))
