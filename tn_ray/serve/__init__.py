"""A reward service on Ray Serve (``tn-ray serve rewards CONFIG``): reward models as batched Serve
deployments behind an HTTP/JSON front that answers raw rewards, TextNorm and ensembles. See
docs/serve.md; the client is :mod:`tn_ray.client`."""
