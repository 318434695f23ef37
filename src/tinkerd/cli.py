"""The `tinkerd` command line."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from tinkerd.config import database_url_from_env, default_data_dir
from tinkerd.core.work_cap import DEFAULT_MAX_QUEUED_PER_USER
from tinkerd.model_store import DEFAULT_MODEL

ANY_KEY_ON_NETWORK_FLAG = "--allow-any-key-on-network"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _keys(data_dir: Path, database_url: str | None):
    from tinkerd.core.db import default_database_url, open_database
    from tinkerd.core.keys import ApiKeys

    data_dir.mkdir(parents=True, exist_ok=True)
    return ApiKeys(open_database(database_url or default_database_url(data_dir)))


def _any_key_refusal(args: argparse.Namespace, data_dir: Path, stored_keys) -> str | None:
    """Why the server must not start: with no keys, any `tml-` key gets in, which is only
    safe while nobody but this machine can connect."""
    if args.api_key or is_loopback(args.host) or stored_keys.any_created():
        return None
    if args.allow_any_key_on_network:
        print(f"tinkerd serve: WARNING: {ANY_KEY_ON_NETWORK_FLAG}: anyone who can reach {args.host}:{args.port} "
              "gets in with any tml- key, and sees and changes everything", file=sys.stderr, flush=True)
        return None
    return (f"tinkerd serve: refusing to listen on {args.host} with no API keys: any tml- key would get in. Create a key "
            f"first (tinkerd keys create --name NAME --data-dir {data_dir}{' --database-url URL' if args.database_url else ''}), "
            "or pass --api-key KEY, or listen on "
            f"127.0.0.1; {ANY_KEY_ON_NETWORK_FLAG} overrides this.")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tinkerd.api.app import create_app
    from tinkerd.core.db import shown
    from tinkerd.core.service import Service
    from tinkerd.model_store import ModelNotFoundError, record_served, resolve_model, seed_hf_cache

    data_dir = Path(args.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    stored_keys = _keys(data_dir, args.database_url)  # opens (and migrates) the database before any model loads: a bad URL fails at once
    if (refusal := _any_key_refusal(args, data_dir, stored_keys)) is not None:
        print(refusal, file=sys.stderr)
        return 2
    sources = {}
    for name in args.model or [DEFAULT_MODEL]:
        try:
            source = resolve_model(name, data_dir)
        except ModelNotFoundError as exc:
            print(f"tinkerd serve: {exc}", file=sys.stderr)
            return 1
        if source.name in sources:
            print(f"tinkerd serve: two --model arguments are both named {source.name!r}", file=sys.stderr)
            return 1
        if args.seed_hf_cache:
            seed_hf_cache(source)
        sources[source.name] = source
    try:
        engines = _start_engines(args, sources)
    except ValueError as exc:  # a cluster that cannot be reached or cannot hold the engines, a wrong replica option
        print(f"tinkerd serve: {exc}", file=sys.stderr)
        return 1
    for source in sources.values():
        record_served(source, data_dir)  # so offline commands given only the name find this directory
    service = Service(data_dir, engines, session_timeout=args.session_timeout, database_url=args.database_url,
                      max_queued_per_user=args.max_queued_per_user)
    keys = set(args.api_key) if args.api_key else None
    app = create_app(service, hold_seconds=args.long_poll_seconds, api_keys=keys,
                     custom_loss_server_side=not args.client_side_custom_losses)
    metadata = f", metadata: {shown(args.database_url)}" if args.database_url else ""
    print(f"tinkerd serving {', '.join(engines)} on http://{args.host}:{args.port} (data: {data_dir}{metadata})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=75)
    if args.ray is not None:
        import ray

        ray.shutdown()  # the engines' actors end with the process that started them
    return 0


def _start_engines(args: argparse.Namespace, sources: dict) -> dict:
    """The engine of each served model: in this process, or as Ray actors with --ray."""
    kv_bytes = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None
    if args.prefix_cache_mb is not None and not 0 <= args.prefix_cache_mb < float("inf"):
        raise ValueError(f"--prefix-cache-mb {args.prefix_cache_mb:g}: must be >= 0 (0 turns prompt reuse off)")
    prefix_bytes = int(args.prefix_cache_mb * 2**20) if args.prefix_cache_mb is not None else None
    if args.ray is None:
        from tinkerd.engine.client import InProcessEngine

        if args.replicas or args.gpus_per_replica or args.cpus_per_replica:
            raise ValueError("--replicas, --gpus-per-replica and --cpus-per-replica place engines on a Ray cluster: give --ray too")
        engines = {}
        for source in sources.values():
            logging.info("loading %s from %s", source.name, source.path)
            engines[source.name] = InProcessEngine(source.name, source.path, device=args.device, kv_cache_bytes=kv_bytes,
                                                   prefix_cache_bytes=prefix_bytes)
        return engines
    from tinkerd.engine.ray_engine import RayClusterError, ReplicaPlan, connect, start_ray_engines

    per_model = {option: _per_model(args, option, sources) for option in ("replicas", "gpus_per_replica", "cpus_per_replica")}
    plans = {name: ReplicaPlan(replicas=int(per_model["replicas"].get(name, 1)), gpus=per_model["gpus_per_replica"].get(name),
                               cpus=per_model["cpus_per_replica"].get(name))
             for name in sources}
    try:
        connect(args.ray)
        return start_ray_engines([(s.name, s.path) for s in sources.values()], plans, args.device, kv_bytes, prefix_bytes)
    except RayClusterError as exc:
        raise ValueError(str(exc)) from None


def _per_model(args: argparse.Namespace, option: str, sources: dict) -> dict[str, float]:
    """A per-replica option's value for each served model: `N` for all of them, `NAME=N` for one."""
    flag = "--" + option.replace("_", "-")
    values: dict[str, float] = {}
    for given in getattr(args, option) or []:
        name, _, number = given.rpartition("=")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"{flag} {given!r}: expected N or NAME=N") from None
        minimum = 1 if option == "replicas" else 0
        if not value < float("inf") or value < minimum or (option == "replicas" and value != int(value)):
            raise ValueError(f"{flag} {given!r}: must be {'a whole number >= 1' if option == 'replicas' else '>= 0'}")
        if name and name not in sources:
            raise ValueError(f"{flag} {given!r}: {name!r} is not a served model ({', '.join(sources)})")
        for served in [name] if name else sources:
            values[served] = value
    return values


def _import_model(args: argparse.Namespace) -> int:
    from tinkerd.model_store import ModelNotFoundError, resolve_model, seed_hf_cache

    try:
        source = resolve_model(args.model, Path(args.data_dir).expanduser())
    except ModelNotFoundError as exc:
        print(f"tinkerd import-model: {exc}", file=sys.stderr)
        return 1
    seed_hf_cache(source)
    print(source.path)
    return 0


def _export_merged(args: argparse.Namespace) -> int:
    from tinkerd.export import AdapterError, export_merged

    try:
        out = export_merged(args.checkpoint, Path(args.out_dir).expanduser(), Path(args.data_dir).expanduser(),
                            model=args.model, dtype=args.dtype, force=args.force, database_url=args.database_url)
    except AdapterError as exc:
        print(f"tinkerd export merged: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _import_adapter(args: argparse.Namespace) -> int:
    from tinkerd.export import AdapterError, import_adapter

    try:
        path = import_adapter(Path(args.peft_dir), Path(args.data_dir).expanduser(), model=args.model, name=args.name,
                              owner=args.owner, database_url=args.database_url)
    except AdapterError as exc:
        print(f"tinkerd import-adapter: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from tinkerd.types import UserError

    try:
        key = _keys(Path(args.data_dir).expanduser(), args.database_url).create(args.name, admin=args.admin)
    except UserError as exc:
        print(f"tinkerd keys create: {exc}", file=sys.stderr)
        return 1
    print(key)
    print(f"the key of {'admin ' if args.admin else ''}user {args.name!r}: it is shown only this once", file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    rows = _keys(Path(args.data_dir).expanduser(), args.database_url).list()
    when = lambda t: t.strftime("%Y-%m-%d %H:%M:%S") if t is not None else "-"  # noqa: E731
    table = [("NAME", "ADMIN", "CREATED", "LAST USED", "REVOKED")] + [
        (r.name, "yes" if r.admin else "no", when(r.created_at), when(r.last_used_at), when(r.revoked_at)) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from tinkerd.core.keys import CACHE_SECONDS
    from tinkerd.types import UserError

    try:
        _keys(Path(args.data_dir).expanduser(), args.database_url).revoke(args.name)
    except UserError as exc:
        print(f"tinkerd keys revoke: {exc}", file=sys.stderr)
        return 1
    print(f"revoked the key of {args.name!r}; a running server refuses it within {CACHE_SECONDS:g} s")
    return 0


def _projects(args: argparse.Namespace):
    from tinkerd.core.db import default_database_url, open_database
    from tinkerd.core.projects import Projects

    data_dir = Path(args.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    return Projects(open_database(args.database_url or default_database_url(data_dir)))


def _projects_command(args: argparse.Namespace) -> int:
    from tinkerd.core.keys import CACHE_SECONDS
    from tinkerd.types import UserError

    try:
        projects = _projects(args)
        if args.projects_command == "create":
            project = projects.create(args.name, args.member or [])
            print(f"created project {project.name!r} with members {', '.join(project.members) or '(none)'}; "
                  f"its sessions: ServiceClient(project_id={project.name!r}) or TINKER_PROJECT_ID={project.name}")
        elif args.projects_command == "add-member":
            projects.add_members(args.name, args.users)
        elif args.projects_command == "remove-member":
            projects.remove_members(args.name, args.users)
        else:
            table = [("PROJECT", "MEMBERS")] + [(p.name, ", ".join(p.members) or "-") for p in projects.list()]
            width = max(len(row[0]) for row in table)
            for name, members in table:
                print(f"{name.ljust(width)}  {members}")
    except UserError as exc:
        print(f"tinkerd projects {args.projects_command}: {exc}", file=sys.stderr)
        return 1
    if args.projects_command in ("add-member", "remove-member"):
        print(f"a running server applies the change within {CACHE_SECONDS:g} s")
    return 0


def add_database_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=database_url_from_env(), metavar="URL",
                        help="where the metadata (runs, checkpoints, keys) lives, as a SQLAlchemy URL, e.g. "
                             "postgresql://USER:PASSWORD@HOST/DB (needs tinkerd[postgres]); the same for the server and "
                             "every offline command (default: $TINKERD_DATABASE_URL, else tinkerd.sqlite in --data-dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinkerd", description="A self-hosted server for the Tinker fine-tuning API.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the Tinker API and the OpenAI-compatible API")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--data-dir", default=str(default_data_dir()),
                       help="state directory: models, checkpoints, metadata (default: $TINKERD_DATA_DIR or ~/.local/share/tinkerd)")
    add_database_url(serve)
    serve.add_argument("--model", action="append", metavar="MODEL",
                       help="base model to serve: a local HF directory, a hub id, or NAME=DIR to serve the local "
                            "directory DIR under the public name NAME (e.g. Qwen/Qwen3-8B=/data/qwen3-8b), which "
                            f"clients pass as base_model; repeatable (default: {DEFAULT_MODEL})")
    serve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    serve.add_argument("--ray", metavar="ADDRESS", default=None,
                       help="run each model's engine as Ray actors on the cluster at ADDRESS (as ray.init takes it: HOST:PORT "
                            "or auto); needs tinkerd[ray], a --data-dir every node mounts at the same path, and the cluster's "
                            "token as Ray's own clients find it (docs/scaling.md). Default: the engines run in this process")
    serve.add_argument("--replicas", action="append", metavar="[NAME=]N",
                       help="with --ray: engines (actors) per model, all models or the one named; repeatable (default: 1)")
    serve.add_argument("--gpus-per-replica", action="append", metavar="[NAME=]G",
                       help="with --ray: GPUs each replica asks Ray for, at most 1 (a fraction shares a GPU); repeatable "
                            "(default: 1 on a cluster with GPUs, else 0)")
    serve.add_argument("--cpus-per-replica", action="append", metavar="[NAME=]C",
                       help="with --ray: CPUs each replica asks Ray for, and its engine's threads; repeatable (default: 1 "
                            "with a GPU, else the largest node's CPUs shared among all replicas)")
    serve.add_argument("--kv-cache-gb", type=float, default=None,
                       help="memory each model's sampler may use for its KV cache, in GiB; requests beyond it wait, and one "
                            "that could never fit is refused (default: half the free GPU memory, or a quarter of the RAM)")
    serve.add_argument("--prefix-cache-mb", type=float, default=None, metavar="MB",
                       help="memory each model's sampler may use, beside its KV cache, to keep recent prompts' K/V for "
                            "later requests that begin alike (samples of one prompt, a growing conversation), least "
                            "recently used out; 0 turns the reuse off (default: 1/8 of the KV cache budget)")
    serve.add_argument("--max-queued-per-user", type=int, default=DEFAULT_MAX_QUEUED_PER_USER, metavar="N",
                       help="requests one user may have in progress at once; past it the server answers 429 and the SDKs "
                            f"send the request again a little later (0: no cap; default: {DEFAULT_MAX_QUEUED_PER_USER})")
    serve.add_argument("--session-timeout", type=float, default=120.0,
                       help="seconds without heartbeat before a session's in-memory state is freed (default: 120)")
    serve.add_argument("--client-side-custom-losses", action="store_true",
                       help="tell the SDK to run create_custom_loss losses on the client (a forward, then a "
                            "cross_entropy backward) instead of uploading them to run here in one pass")
    serve.add_argument("--long-poll-seconds", type=float, default=25.0, help="how long retrieve_future holds (default: 25)")
    serve.add_argument("--api-key", action="append",
                       help="also accept this key, as the one local user; repeatable (default, while no key was created "
                            "with `tinkerd keys create`: any tml- key)")
    serve.add_argument(ANY_KEY_ON_NETWORK_FLAG, action="store_true",
                       help="with no API keys, listen on a non-loopback --host anyway, letting in anyone with any tml- key")
    serve.add_argument("--no-seed-hf-cache", dest="seed_hf_cache", action="store_false",
                       help="do not add the served models' tokenizers to the local Hugging Face cache under their names")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)

    imp = sub.add_parser("import-model", help="import (and cache) a base model without serving")
    imp.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help=f"as for `serve --model`: a local HF directory, a hub id, or NAME=DIR (default: {DEFAULT_MODEL})")
    imp.add_argument("--data-dir", default=str(default_data_dir()))
    imp.set_defaults(func=_import_model)

    export = sub.add_parser("export", help="export a checkpoint for other tools")
    export_sub = export.add_subparsers(dest="export_format", required=True)
    merged = export_sub.add_parser(
        "merged", help="write a full Hugging Face model with the adapter merged in (loadable by transformers)")
    merged.add_argument("checkpoint", help="a tinker:// path (looked up in --data-dir) or a PEFT adapter directory")
    merged.add_argument("out_dir", help="directory to write the merged model to")
    merged.add_argument("--data-dir", default=str(default_data_dir()), help="the server's state directory")
    add_database_url(merged)
    merged.add_argument("--model", default=None,
                        help="base model (HF directory or name); default: the checkpoint's own base model")
    merged.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    merged.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    merged.set_defaults(func=_export_merged)

    imp_adapter = sub.add_parser(
        "import-adapter", help="bring a PEFT LoRA adapter in as a checkpoint (prints its tinker:// path)")
    imp_adapter.add_argument("peft_dir", help="directory with adapter_config.json + adapter_model.safetensors")
    imp_adapter.add_argument("--data-dir", default=str(default_data_dir()), help="the server's state directory")
    add_database_url(imp_adapter)
    imp_adapter.add_argument("--model", default=None,
                             help="the served base model it is for (as given to `serve --model`); "
                                  "default: the adapter's base_model_name_or_path")
    imp_adapter.add_argument("--name", default=None, help="checkpoint name (default: imported)")
    imp_adapter.add_argument("--owner", default="local",
                             help="the user (as named by `tinkerd keys create`) who owns the imported checkpoint "
                                  "(default: local, the user of a server without keys)")
    imp_adapter.set_defaults(func=_import_adapter)

    keys = sub.add_parser("keys", help="API keys of named users (offline, against --data-dir; also while the server runs)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a user and print it (only its hash is stored)")
    create.add_argument("--name", required=True, help="the user: owner of what the key creates")
    create.add_argument("--admin", action="store_true", help="the user may see and change everything")
    create.set_defaults(func=_keys_create)
    listing = keys_sub.add_parser("list", help="users, admin, created, last used, revoked (never the keys)")
    listing.set_defaults(func=_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a user's key; a running server refuses it within seconds")
    revoke.add_argument("name")
    revoke.set_defaults(func=_keys_revoke)
    for command in (create, listing, revoke):
        command.add_argument("--data-dir", default=str(default_data_dir()), help="the server's state directory")
        add_database_url(command)

    projects = sub.add_parser("projects", help="projects: users who read each other's runs and checkpoints (offline, "
                                               "against --data-dir; also while the server runs)")
    projects_sub = projects.add_subparsers(dest="projects_command", required=True)
    p_create = projects_sub.add_parser("create", help="create a project; its name is the project_id sessions give")
    p_create.add_argument("name")
    p_create.add_argument("--member", action="append", metavar="USER", help="a member (a user named by `tinkerd keys "
                                                                               "create`); repeatable")
    p_list = projects_sub.add_parser("list", help="projects and their members")
    p_add = projects_sub.add_parser("add-member", help="add users to a project")
    p_remove = projects_sub.add_parser("remove-member", help="remove users from a project")
    for command in (p_add, p_remove):
        command.add_argument("name")
        command.add_argument("users", nargs="+", metavar="USER")
    for command in (p_create, p_list, p_add, p_remove):
        command.add_argument("--data-dir", default=str(default_data_dir()), help="the server's state directory")
        add_database_url(command)
        command.set_defaults(func=_projects_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from tinkerd.core.db import DatabaseError

    try:
        return args.func(args)
    except DatabaseError as exc:  # a wrong --database-url, an unreachable server, ...: one line, not a traceback
        print(f"tinkerd {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
