"""The interactive explorer: a local web app that ranks, steers and explains a gallery live.

* ``rankings`` — :class:`~reid_jax.explorer.rankings.Explorer`: a run loaded once (embeddings
  on the device, the attribute head, the dataset scan, the model for uploads) and every answer
  of the API as plain JSON-able dicts, computed with the jitted kernels of
  ``reid_jax.explain`` (``explain.run.explain_queries`` / ``make_record`` for the unsteered
  ranking of a dataset query, ``explain.steering`` for the rest).
* ``uploads`` — decoding and checking an uploaded query image (size and pixel limits).
* ``params`` — request parameters to values, or a 400 naming the parameter.
* ``app`` — the Starlette app: the page, the JSON API, security headers, error handling.
* ``static/`` — the page (HTML, CSS, JavaScript; no build step, nothing fetched from elsewhere).

``tools/serve.py`` starts it; ``docs/explorer.md`` in the repository describes the design.
"""
