"""``tn-ray serve rewards CONFIG``: the reward service on Ray Serve (docs/serve.md)."""
from __future__ import annotations

from tn_ray.commands.options import add_run_options, load


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve reward models over HTTP on Ray Serve (batched raw rewards, TextNorm, "
                                     "ensembles)")
    cmds = p.add_subparsers(dest="serve_command", required=True)
    r = cmds.add_parser("rewards", help="the reward service: one Serve deployment per reward model behind an "
                                        "HTTP/JSON front (127.0.0.1 by default; other addresses need a token)")
    r.add_argument("config", help="YAML config (ServeConfig), e.g. sweeps/serve_rewards.yaml")
    r.add_argument("--host", help="bind address (overrides `host`); anything but loopback needs the token")
    r.add_argument("--port", type=int, help="TCP port (overrides `port`)")
    add_run_options(r, "replica.max_batch_size=128", provenance=False)
    r.add_argument("--detach", action="store_true",
                   help="deploy and return (the application lives as long as its Ray cluster, e.g. one joined "
                        "with --set ray.address=auto); default: serve until Ctrl-C")
    r.add_argument("--write-deploy", metavar="FILE",
                   help="write Serve's config file of this application (http_options, import_path of its builder, "
                        "args: the config) to FILE for `serve deploy FILE` / `serve run FILE`, and exit without "
                        "starting anything")
    r.set_defaults(func=rewards)


def rewards(args) -> int:
    import signal
    import time

    from tn_ray.serve.config import TOKEN_ENV, ServeConfig, service_token

    cfg = load(args, ServeConfig, host=args.host, port=args.port)
    if args.write_deploy:
        return write_deploy(cfg, args.write_deploy)
    token, generated = service_token(cfg)  # every check before Ray starts
    from ray import serve

    from tn_ray.serve.app import start

    url = start(cfg, token)
    print(f"reward service: {url}/v1/score ({', '.join(cfg.columns)})")
    if generated:
        print(f"token (send 'Authorization: Bearer <token>'; set {TOKEN_ENV} to keep one across restarts): {token}")
    elif token:
        print(f"token: from {TOKEN_ENV}")
    if args.detach:
        return 0

    def stop(signum, frame):  # SIGTERM (a service manager's stop) ends the service as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the reward service")
        serve.delete(cfg.app_name)
    return 0


def write_deploy(cfg, path: str) -> int:
    """Write Serve's config file of ``cfg``'s application (:func:`tn_ray.serve.app.deploy_config`) to ``path``."""
    import yaml

    from tn_ray.serve.app import deploy_config
    from tn_ray.serve.config import TOKEN_ENV
    from tn_ray.storage import check_output_file

    out = check_output_file(path)
    head = (f"# Serve's config of the reward service {cfg.app_name!r} (tn-ray serve rewards --write-deploy): "
            f"serve deploy {out.name}\n")
    out.write_text(head + yaml.safe_dump(deploy_config(cfg), sort_keys=False))
    print(f"wrote {out}: `serve deploy {out}` on a running cluster (or `serve run {out}`)")
    if cfg.token_required:
        print(f"the application needs {TOKEN_ENV} where Serve builds it (the cluster's environment or the "
              "application's runtime_env env_vars); it is not written in the file")
    return 0
