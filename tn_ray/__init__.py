from tn_ray._version import __version__  # noqa: F401  (re-exported)
