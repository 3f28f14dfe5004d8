"""The intent-recognition application: MVCL-DAF++ on MIntRec / MIntRec2.0 over the op library.

The model, the data sets (and the synthetic one), training, prediction and the analyses, with
their command lines ``python -m mvcl_fast.train | predict | analyze``. It needs transformers,
scikit-learn and matplotlib besides torch; the op library above it (``mvcl_fast``: the ops and
the drop-in losses) needs torch alone and imports nothing from here.
"""
