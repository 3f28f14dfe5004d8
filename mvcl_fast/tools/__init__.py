"""Tooling around the kernels of mvcl_fast.kernels, never imported by the ops: the
ahead-of-time compile report (``python -m mvcl_fast.tools.report``), the launches it compiles
(``aot_launches``, one module per op) and the device-structure counter (``structure``)."""
