"""The segmentctl command line: one subcommand per command type, --wait for the outcome, status,
tail of outcomes and bulk import. Exit codes: 0 applied (or published), 1 rejected or invalid,
2 bad input, 3 Kafka or the API unreachable, or no outcome in time."""

from __future__ import annotations

import asyncio
import getpass
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from segmentctl.bulk import publish_all, read_assignments
from segmentctl.failures import (
    EXIT_BAD_INPUT,
    EXIT_REJECTED,
    EXIT_TIMED_OUT,
    EXIT_UNAUTHORIZED,
    EXIT_UNAVAILABLE,
    err,
    fail,
    follow,
    run_async,
)
from segmentctl.output import json_text, print_lines, shown
from segmentctl.watch import watch
from shared.api_keys import SCOPES, KeyFileError, new_key
from shared.client import CommandPublisher, OutcomeReader
from shared.commands import command_adapter
from shared.durations import parse_duration
from shared.query_client import QueryApiError, QueryClient
from shared.settings import CliSettings, KafkaSettings, Settings
from shared.settings import explain as explain_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Publish segmentation commands to Kafka and follow their outcomes.\n\n"
                       "Without options it finds a `make run` of this checkout (DATA_DIR/stack.json); "
                       "KAFKA_BOOTSTRAP_SERVERS, SEGMENTCTL_API_URL and SEGMENTCTL_API_KEY, or the options, "
                       "win over it.\n\n"
                       "Exit codes: 0 applied (or published without --wait); 1 rejected or invalid; "
                       "2 bad input; 3 Kafka or the query API unreachable; 4 the API key is missing, not "
                       "valid, or lacks the scope (named in the message); 5 no outcome within --timeout.")
segment_app = typer.Typer(no_args_is_help=True, help="Segment commands (topic segments.commands, keyed by slug).")
user_app = typer.Typer(no_args_is_help=True, help="User commands (topic assignments.commands, keyed by user id).")
app.add_typer(segment_app, name="segment")
app.add_typer(user_app, name="user")


@dataclass
class Config:
    settings: KafkaSettings
    api_url: str
    api_key: str | None
    timeout: float


WaitOption = Annotated[bool, typer.Option("--wait", "-w", help="Wait for the outcome and print it.")]
CommandIdOption = Annotated[str | None, typer.Option(metavar="ID",
    help="Command id (1-64 chars); publishing the same id again changes nothing. Default: a random one.")]
ActorOption = Annotated[str | None, typer.Option(
    metavar="NAME", help="Who issues the command, kept in the audit trail. Default: segmentctl:<login name>.")]
SlugArgument = Annotated[str, typer.Argument(metavar="SLUG", help="Segment slug, e.g. AVITO_VOICE_MESSAGES.")]
UserIdArgument = Annotated[int, typer.Argument(metavar="USER_ID", help="User id, 1 … 2^63-1.", min=1)]


@app.callback()
def options(
    ctx: typer.Context,
    bootstrap_servers: Annotated[str | None, typer.Option(
        metavar="HOST:PORT", show_default=False,
        help="Kafka bootstrap servers (default: KAFKA_BOOTSTRAP_SERVERS, else the running `make run`'s broker, "
             "else localhost:9092).")] = None,
    api_url: Annotated[str | None, typer.Option(
        metavar="URL", show_default=False,
        help="Query API base URL, for `status` and `user segments` (default: SEGMENTCTL_API_URL, else the "
             "running `make run`'s API, else http://127.0.0.1:8080).")] = None,
    api_key: Annotated[str | None, typer.Option(
        metavar="KEY", show_default=False,
        help="API key for the query API when it has access control on (default: SEGMENTCTL_API_KEY).")] = None,
    timeout: Annotated[float, typer.Option(metavar="SECONDS", min=0.1,
                                           help="Seconds to wait for Kafka, the API or an outcome.")] = 30.0,
) -> None:
    """Topic names and the Kafka connection (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*) come
    from the same settings as the services."""
    try:
        settings = Settings()
        cli = CliSettings()
    except ValidationError as error:
        raise fail(explain_settings(error), EXIT_BAD_INPUT) from None
    bootstrap = bootstrap_servers or settings.kafka_bootstrap_servers or f"localhost:{settings.embedded_kafka_port}"
    settings = settings.model_copy(update={"kafka_bootstrap_servers": bootstrap})
    key = api_key or (cli.segmentctl_api_key.get_secret_value() if cli.segmentctl_api_key else None)
    url = api_url or cli.segmentctl_api_url or f"http://127.0.0.1:{settings.api_port}"
    ctx.obj = Config(settings.section(KafkaSettings), url.rstrip("/"), key, timeout)


def _print_json(value: Any) -> None:
    sys.stdout.write(json_text(value, indent=True) + "\n")


def _exit_code(error: QueryApiError) -> int:
    if error.status in (401, 403):
        return EXIT_UNAUTHORIZED
    return EXIT_BAD_INPUT if error.status == 422 else EXIT_UNAVAILABLE


def _envelope(command: dict[str, Any], command_id: str | None, actor: str | None) -> dict[str, Any]:
    command = {key: value for key, value in command.items() if value is not None}
    if command_id:
        command["command_id"] = command_id
    command["actor"] = actor or f"segmentctl:{getpass.getuser()}"
    return command


def _send(config: Config, command: dict[str, Any], wait: bool) -> None:
    async def run() -> int:
        command_adapter.validate_python(command)  # a bad command is refused before connecting
        async with CommandPublisher(config.settings, timeout=config.timeout) as publisher:
            if not wait:
                sent = await publisher.publish(command)
                _print_json({"command_id": sent.command_id, "topic": sent.topic, "partition": sent.partition,
                             "offset": sent.offset})
                return 0
            async with OutcomeReader(config.settings, timeout=config.timeout) as outcomes:
                sent = await publisher.publish(command)
                found = await outcomes.wait_for([sent.command_id], config.timeout)
        if sent.command_id not in found:
            raise fail(f"published {sent.command_id} to {sent.topic}[{sent.partition}]@{sent.offset}, but no "
                        f"outcome within {config.timeout:g}s (is the command consumer running?)", EXIT_TIMED_OUT)
        outcome = found[sent.command_id]
        _print_json(outcome)
        return 0 if outcome["status"] == "applied" else EXIT_REJECTED

    code = run_async(run())
    if code:
        raise typer.Exit(code)


@segment_app.command("create")
def segment_create(
    ctx: typer.Context, slug: SlugArgument,
    percent: Annotated[float, typer.Option(metavar="PERCENT", min=0, max=100,
                                           help="Share of all users covered automatically, 0-100.")] = 0,
    description: Annotated[str | None, typer.Option(metavar="TEXT", help="What the segment is for.")] = None,
    wait: WaitOption = False, command_id: CommandIdOption = None, actor: ActorOption = None,
) -> None:
    """Create a segment, optionally covering a percent of all users."""
    _send(ctx.obj, _envelope({"type": "create_segment", "slug": slug, "percent": _percent(percent),
                              "description": description}, command_id, actor), wait)


@segment_app.command("update")
def segment_update(
    ctx: typer.Context, slug: SlugArgument,
    percent: Annotated[float | None, typer.Option(metavar="PERCENT", help="New rollout percent, 0-100.", min=0,
                                                 max=100)] = None,
    description: Annotated[str | None, typer.Option(metavar="TEXT", help="New description.")] = None,
    wait: WaitOption = False, command_id: CommandIdOption = None, actor: ActorOption = None,
) -> None:
    """Change a segment's rollout percent and/or description."""
    if percent is None and description is None:
        raise fail("give --percent and/or --description", EXIT_BAD_INPUT)
    _send(ctx.obj, _envelope({"type": "update_segment", "slug": slug, "percent": _percent(percent),
                              "description": description}, command_id, actor), wait)


@segment_app.command("delete")
def segment_delete(ctx: typer.Context, slug: SlugArgument, wait: WaitOption = False,
                   command_id: CommandIdOption = None, actor: ActorOption = None) -> None:
    """Delete a segment: every user leaves it (history D, reason segment_deleted)."""
    _send(ctx.obj, _envelope({"type": "delete_segment", "slug": slug}, command_id, actor), wait)


@user_app.command("create")
def user_create(ctx: typer.Context, user_id: UserIdArgument, wait: WaitOption = False,
                command_id: CommandIdOption = None, actor: ActorOption = None) -> None:
    """Register a user id (repeating it is a no-op)."""
    _send(ctx.obj, _envelope({"type": "create_user", "user_id": user_id}, command_id, actor), wait)


@user_app.command("update")
def user_update(
    ctx: typer.Context, user_id: UserIdArgument,
    add: Annotated[str | None, typer.Option(metavar="SLUGS", help="Segments to add, comma-separated: A,B.")] = None,
    remove: Annotated[str | None, typer.Option(metavar="SLUGS", help="Segments to remove, comma-separated.")] = None,
    ttl: Annotated[str | None, typer.Option(metavar="DURATION",
                                            help="Added segments expire after this: 90s, 15m, 2h, 2d, 1w.")] = None,
    expires_at: Annotated[str | None, typer.Option(
        metavar="TIME", help="Added segments expire at this RFC 3339 time.")] = None,
    wait: WaitOption = False, command_id: CommandIdOption = None, actor: ActorOption = None,
) -> None:
    """Add and remove a user's segments in one atomic command."""
    if not add and not remove:
        raise fail("give --add and/or --remove", EXIT_BAD_INPUT)
    if ttl and expires_at:
        raise fail("give --ttl or --expires-at, not both", EXIT_BAD_INPUT)
    try:
        ttl_seconds = parse_duration(ttl) if ttl else None
    except ValueError as error:
        raise fail(f"--ttl: {error}", EXIT_BAD_INPUT) from None
    _send(ctx.obj, _envelope({"type": "update_user_segments", "user_id": user_id, "add": _slugs(add),
                              "remove": _slugs(remove), "ttl_seconds": ttl_seconds, "expires_at": expires_at},
                             command_id, actor), wait)


@app.command()
def status(ctx: typer.Context,
           command_id: Annotated[str, typer.Argument(metavar="COMMAND_ID", help="The command's id.")]) -> None:
    """Print a command's stored outcome (from the query API)."""
    config: Config = ctx.obj

    async def fetch() -> dict[str, Any] | None:
        async with QueryClient(config.api_url, config.api_key, config.timeout) as api:
            return await api.command_outcome(command_id)

    try:
        outcome = asyncio.run(fetch())
    except QueryApiError as error:
        raise fail(str(error), _exit_code(error)) from None
    if outcome is None:
        raise fail(f"{command_id}: not processed (yet)", EXIT_REJECTED)
    _print_json(outcome)
    if outcome["status"] != "applied":
        raise typer.Exit(EXIT_REJECTED)


@user_app.command("segments")
def user_segments(
    ctx: typer.Context, user_id: UserIdArgument,
    token: Annotated[str | None, typer.Option(
        "--token", metavar="TOKEN", help="An outcome's consistency_token (printed by --wait): the answer "
                                         "reflects that command, even when the API reads from replicas.")] = None,
) -> None:
    """Print the segments a user is in now (from the query API; needs the scope read)."""
    config: Config = ctx.obj

    async def fetch() -> list[dict[str, Any]]:
        async with QueryClient(config.api_url, config.api_key, config.timeout) as api:
            return await api.user_segments(user_id, token)

    try:
        _print_json({"user_id": user_id, "segments": asyncio.run(fetch())})
    except QueryApiError as error:
        raise fail(str(error), _exit_code(error)) from None


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the query API (API_KEYS_FILE).")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(metavar="NAME",
                                      help="Who uses the key; the actor of the commands it publishes.")],
    scopes: Annotated[str, typer.Option(metavar="SCOPES", help=f"Comma-separated, of: {', '.join(SCOPES)}.")],
) -> None:
    """Make a new key: prints the key (give it to its user; it is not stored anywhere) and the line to
    add to API_KEYS_FILE (it holds the key's SHA-256 only). The API picks the line up within a second."""
    try:
        key, line = new_key(name, [scope.strip() for scope in scopes.split(",") if scope.strip()])
    except KeyFileError as error:
        raise fail(str(error).removeprefix("line 1: "), EXIT_BAD_INPUT) from None
    sys.stdout.write(f"key:  {key}\nline: {line}\n")


def outcome_line(outcome: dict[str, Any]) -> str:
    """One outcome as `tail` prints it, every field from the wire escaped."""
    error = outcome.get("error")
    reason = f"  {shown(error.get('code'))}: {shown(error.get('message'))}" if isinstance(error, dict) else ""
    return (f"{shown(outcome.get('processed_at'))} {shown(outcome.get('status')):<8} "
            f"{shown(outcome.get('type') or '-'):<20} {shown(outcome.get('command_id'))}{reason}")


@app.command()
def tail(
    ctx: typer.Context,
    from_beginning: Annotated[bool, typer.Option(help="Start at the oldest outcome kept by Kafka.")] = False,
    only_status: Annotated[str | None, typer.Option("--status", metavar="STATUS",
                                                    help="Only applied, rejected or invalid.")] = None,
    only_type: Annotated[str | None, typer.Option("--type", metavar="TYPE", help="Only this command type.")] = None,
    limit: Annotated[int | None, typer.Option(metavar="COUNT", help="Stop after this many outcomes.", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON outcome per line.")] = False,
) -> None:
    """Follow outcomes on the results topic as they are published (Ctrl-C to stop)."""
    config: Config = ctx.obj

    def line(outcome: dict[str, Any]) -> str | None:
        if (only_status and outcome.get("status") != only_status) or (only_type and outcome.get("type") != only_type):
            return None
        return json_text(outcome) if as_json else outcome_line(outcome)

    async def run() -> None:
        async with OutcomeReader(config.settings, from_beginning=from_beginning, timeout=config.timeout) as outcomes:
            await print_lines(outcomes, line, limit)

    follow(run())


@app.command("import")
def import_csv(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE",
                                         help="CSV with a header: user_id,segment_slug[,action][,ttl]; action is "
                                              "add (default) or remove, ttl like 2d.", exists=True, dir_okay=False)],
    wait: Annotated[bool, typer.Option(help="Wait for every outcome and summarise them.")] = True,
    skip_invalid: Annotated[bool, typer.Option(help="Publish the valid rows even if some are invalid.")] = False,
    actor: ActorOption = None,
) -> None:
    """Publish user → segment assignments in bulk, one command per row, with a progress bar and a summary.

    Command ids come from the file's content and line numbers, so importing the same file again
    changes nothing and reports the stored outcomes."""
    config: Config = ctx.obj
    try:
        parsed = read_assignments(file, actor or f"segmentctl:{getpass.getuser()}")
    except ValueError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None
    for line, message in parsed.errors[:20]:
        err.print(f"line {line}: {shown(message)}", highlight=False, markup=False)
    if parsed.errors and not skip_invalid:
        raise fail(f"{parsed.invalid} invalid rows, nothing published (fix them, or --skip-invalid)",
                    EXIT_BAD_INPUT)
    if not parsed.rows:
        raise fail("no rows to import", EXIT_BAD_INPUT)
    lines = {row.command["command_id"]: row.line for row in parsed.rows}
    summary = run_async(publish_all(config.settings, [row.command for row in parsed.rows], wait, config.timeout, err))
    counts = {status: 0 for status in ("applied", "rejected", "invalid")}
    problems = []
    for command_id, outcome in summary.items():
        counts[outcome["status"]] = counts.get(outcome["status"], 0) + 1
        if outcome["status"] != "applied":
            problems.append((lines[command_id], outcome["status"], outcome.get("error") or {}))
    for line, status_, error in sorted(problems)[:20]:
        err.print(f"line {line}: {shown(status_)} {shown(error.get('code', ''))}: {shown(error.get('message', ''))}",
                  highlight=False,
                  markup=False)
    published = len(parsed.rows)
    if not wait:
        sys.stdout.write(f"published {published} commands, {parsed.invalid} invalid rows skipped\n")
        return
    missing = published - len(summary)
    sys.stdout.write(f"applied {counts['applied']}, rejected {counts['rejected']}, invalid {counts['invalid']}, "
                     f"no outcome {missing}, skipped {parsed.invalid} (of {published + parsed.invalid} rows)\n")
    if missing:
        raise typer.Exit(EXIT_UNAVAILABLE)
    if counts["rejected"] or counts["invalid"] or parsed.errors:
        raise typer.Exit(EXIT_REJECTED)


def _slugs(text: str | None) -> list[str]:
    return [slug.strip() for slug in (text or "").split(",") if slug.strip()]


def _percent(value: float | None) -> float | int | None:
    """2.5 → 2.5 and 10.0 → 10, exactly as typed (the contract allows two decimals)."""
    if value is None:
        return None
    number = Decimal(repr(value))
    return int(number) if number == number.to_integral_value() else float(number)


app.command()(watch)


def main() -> None:
    app()
