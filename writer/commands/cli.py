"""`blisswriter`: run the writer service, validate files, show status (or wait for a scan),
rewrite files, end a scan whose producer died, serve files to a web browser."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from blissdata.store import url_from

from ..service.config import ConfigError, load_config
from ..service.logs import setup_logging
from ..service.metrics import MetricsError
from . import status_command
from .status_command import MIN_INTERVAL_S, check_count, check_interval


def _run(args) -> int:
    from ..protocols.blissdata2.protocol import ModulesMissing
    from ..service.service import WriterService

    protocols = ([p.strip() for arg in args.protocol for p in arg.split(",")]
                 if args.protocol else None)  # checked with the configuration
    try:
        config = load_config(args.config, redis_url=args.redis or os.environ.get("REDIS_URL"),
                             sessions=args.session or None, data_roots=args.data_root or None,
                             log_level=args.log_level, log_json=args.log_json or None,
                             protocols=protocols,
                             wait_for_redis=False if args.no_wait_for_redis else None)
    except ConfigError as exc:
        print(f"blisswriter: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_json)
    try:
        service = WriterService(config)
    except ConnectionError as exc:
        print(f"blisswriter: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while waiting for Redis at start
        return 130
    except MetricsError as exc:
        print(f"blisswriter: {exc}", file=sys.stderr)
        return 2
    except ModulesMissing as exc:  # --protocol blissdata2 on a Redis without its modules
        print(f"blisswriter: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    service.run()
    return 0


def _status(args) -> int:
    url = url_from(args.redis)
    if args.wait is not None:
        from . import scan_wait

        return scan_wait.main(url, args.wait, session=args.session, timeout=args.timeout)
    if args.timeout is not None:
        print("blisswriter status: --timeout goes with --wait SCAN", file=sys.stderr)
        return 2
    return status_command.main(url, watch=args.watch, interval=args.interval, as_json=args.json,
                               session=args.session, state=args.state,
                               last=None if args.all else args.last,
                               wait_for_redis=not args.no_wait_for_redis)


def _end(args) -> int:
    from . import scan_end

    return scan_end.main(url_from(args.redis), args.scan, session=args.session,
                         reason=args.reason, message=args.message)


def _rewrite(args) -> int:
    from .rewrite import main as rewrite_main

    return rewrite_main(args.args)


def _validate(args) -> int:
    from .validate import main as validate_main

    return validate_main(args.files)


def _serve(args) -> int:
    from ..web.server import serve

    roots = args.data_root
    if not roots:
        try:
            roots = load_config(args.config).data_roots
        except ConfigError as exc:
            print(f"blisswriter serve: {exc}", file=sys.stderr)
            return 2
    redis_url = None if args.no_redis else url_from(args.redis)
    try:
        serve(roots, host=args.host, port=args.port, redis_url=redis_url,
              base_path=args.base_path, max_selection_mb=args.max_selection_mb,
              on_ready=lambda url: print(f"blisswriter serve: {url}  (data roots: "
                                         f"{', '.join(map(str, roots))}; Ctrl-C stops)",
                                         flush=True))
    except (ValueError, OSError) as exc:  # a bad root or base path, a port in use
        print(f"blisswriter serve: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["rewrite"]:  # its own parser, with its own --help (argparse's REMAINDER
        return _rewrite(argparse.Namespace(args=argv[1:]))  # would refuse a leading option)
    parser = argparse.ArgumentParser(prog="blisswriter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="follow new scans and write them to NeXus/HDF5 files")
    run.add_argument("--config", help="TOML configuration (default: built-in defaults)")
    run.add_argument("--redis", help="Redis URL (default: REDIS_URL, then the config's "
                                     "redis_url)")
    run.add_argument("--session", action="append", help="session to follow (repeatable)")
    run.add_argument("--data-root", action="append", help="allowed data root (repeatable)")
    run.add_argument("--no-wait-for-redis", action="store_true",
                     help="exit 1 if Redis is unreachable at start (default: wait for it, "
                          "as for a Redis lost later; the config's wait_for_redis)")
    run.add_argument("--log-level", type=str.upper,
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    run.add_argument("--protocol", action="append",
                     help="scans to follow: native (default: the config's protocols), "
                          "blissdata2 (ESRF's blissdata 2.x, written from info['h5maps']), "
                          "or both: native,blissdata2")
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="scans being written and recently finished")
    status.add_argument("--redis", help="Redis URL (default: REDIS_URL, then localhost)")
    status.add_argument("--watch", action="store_true",
                        help="refresh until Ctrl-C (waits for Redis if it is unreachable, "
                             "at start or later)")
    status.add_argument("--no-wait-for-redis", action="store_true",
                        help="with --watch: exit 1 if Redis is unreachable at start")
    status.add_argument("--interval", type=check_interval, default=1.0,
                        help=f"seconds between refreshes with --watch (default 1, at least "
                             f"{MIN_INTERVAL_S})")
    status.add_argument("--json", action="store_true",
                        help="the statuses as JSON, for scripts (one line per refresh)")
    status.add_argument("--session", help="only the scans of this session")
    status.add_argument("--state", choices=["waiting", "writing", "idle", "done", "failed",
                                            "skipped"],
                        help="only the scans in this state")
    status.add_argument("--last", type=check_count, default=10, metavar="N",
                        help="the N scans finished most recently (default 10), and every "
                             "scan not finished")
    status.add_argument("--all", action="store_true",
                        help="every scan of the last 24 h")
    status.add_argument("--wait", metavar="SCAN",
                        help="wait until the writer has finished this scan (its key, or its "
                             "number: the latest scan with that number, of --session if "
                             "given); exit 0 done, 1 failed, 3 timeout, 4 skipped, 5 Redis "
                             "unreachable")
    status.add_argument("--timeout", type=check_interval, metavar="SECONDS",
                        help="with --wait: give up after this long (exit 3; default: never)")
    status.set_defaults(func=_status)

    end = sub.add_parser("end", help="end a scan whose producer died, so the writer "
                                     "finishes its file")
    end.add_argument("scan", help="the scan's key, or its number (the latest scan with "
                                  "that number, of --session if given)")
    end.add_argument("--session", help="the scan's session (with a number)")
    end.add_argument("--reason", type=str.upper, default="FAILURE",
                     choices=["FAILURE", "USER_ABORT", "SUCCESS"],
                     help="end_reason recorded in the scan and its file (default FAILURE)")
    end.add_argument("--message", default="",
                     help="why, kept in the scan's info (end_message)")
    end.add_argument("--redis", help="Redis URL (default: REDIS_URL, then localhost)")
    end.set_defaults(func=_end)

    # listed here for `blisswriter --help`; main() hands its arguments to rewrite.main
    sub.add_parser("rewrite", help="rewrite a file with other storage settings", add_help=False)

    validate = sub.add_parser("validate", help="validate files against the NeXus definitions")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=_validate)

    serve = sub.add_parser("serve", help="the scans' files in a web browser (h5web), live",
                           description="Serve a page where a browser explores the HDF5 files "
                                       "under the data roots with h5web, and follows the "
                                       "writer's running scans live. Read-only.")
    serve.add_argument("--data-root", action="append",
                       help="folder whose files are served (repeatable; default: the "
                            "config's data_roots)")
    serve.add_argument("--config", help="writer TOML configuration, for its data_roots")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; "
                            "0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int,
                       help="port (default: 8765, else the next free one up to 8774; 0: any "
                            "free one)")
    serve.add_argument("--base-path", default="/",
                       help="URL prefix the page lives under behind a reverse proxy that "
                            "does not strip it, e.g. /viewer (default /)")
    serve.add_argument("--redis", help="Redis URL for the list of scans (default: REDIS_URL, "
                                       "then localhost)")
    serve.add_argument("--no-redis", action="store_true",
                       help="no list of scans: only the file browser")
    serve.add_argument("--max-selection-mb", type=float, default=64.0,
                       help="largest slice one request may read, MB (default 64)")
    serve.set_defaults(func=_serve)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
