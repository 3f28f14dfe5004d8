"""Per op, the launches ``python -m mvcl_fast.tools.report`` compiles: each module declares
``aot_launches()`` (mvcl_fast.tools.aot says what it returns) and is named after its op."""
