from tn_ray._version import __version__
