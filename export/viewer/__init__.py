"""``stimage view``: a local web app over a slide or a section — deep-zoom H&E
(OpenSeadragon, shipped in ``static/``), predicted genes and their uncertainty as overlays,
a spot panel, LIME over nuclei on demand, and ``.onnx`` model upload. JAX-free: a Starlette
app (:mod:`export.viewer.app`) over :class:`export.viewer.state.ViewerState`, served by
uvicorn on a loopback address (:mod:`export.viewer.__main__`)."""
